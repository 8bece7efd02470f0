"""The `featbench` command: one Hydra job = model x layer x hook x method x seed.

    featbench                                  # the defaults (conf/config.yaml)
    featbench experiment=smoke                 # a small end-to-end run
    featbench -m method=diffmean layer=3,6     # a sweep (Hydra multirun)
    featbench --cfg job                        # print the composed config

Order of work: validate the config and build the method and task objects
(cheap, so mistakes surface before anything slow), load the dataset, the
model and the cached activations, fit the method on the train split, run each
task, and write `metrics.parquet` (atomically) beside a redacted
`config.yaml` and the fitted features.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench import activations, datasets
from bench.config import validate
from bench.contexts import top_contexts
from bench.errors import ConfigError, FeatbenchError
from bench.judges.base import Judge
from bench.models import load_model
from bench.results import (
    FAILED_FILE,
    METRICS_FILE,
    REDACTED,
    config_hash,
    finalize,
    is_secret_name,
    read_metrics,
    redact,
    write_metrics,
)
from bench.storage import atomic_write_text, sha256_json
from methods.base import Method
from tasks.base import Task, TaskData

log = logging.getLogger(__name__)

# Errors a user can fix: shown as one line, no traceback (anything else is a bug).
USER_ERRORS = (FeatbenchError, FloatingPointError)
CHECKPOINTS = "checkpoints"  # per-job folder of partial task results (steering, per feature)
# Overrides that do not change what a job computes: they neither name the sweep's
# folder nor the job's (a re-run with force=true or another logger finds the same jobs).
NOT_IN_NAMES = ("force", "logger", "paths")


def _keep(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return not any(
        key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NOT_IN_NAMES
    )


def _slug(text: str, limit: int = 100) -> str:
    """A folder name from override text: path separators and odd characters
    become '-', and a long name keeps its start plus a hash of the whole."""
    slug = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "-", text)
    return slug if len(slug) <= limit else f"{slug[: limit - 17]}-{sha256_json(text)[:16]}"


def sweep_name() -> str:
    """The sweep's folder under results/multirun/: its command-line overrides,
    sorted, so running the same sweep again finds its finished jobs.

    Read from the command line when the sweep's own config is first resolved,
    and cached: Hydra copies the resolver cache into every job's config (as it
    does for `${now:...}`), so all jobs of a sweep, in any launcher's worker
    processes, share the folder.
    """
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    kept = sorted(o for o in overrides if _keep(o) and not o.lstrip("+~").startswith("hydra"))
    return _slug("__".join(kept)) if kept else "default"


def job_name(overrides: Any) -> str:
    """A job's folder inside its sweep: the overrides that make it this job, sorted."""
    kept = sorted(str(o) for o in (overrides or []) if _keep(str(o)))
    return _slug(",".join(kept)) if kept else "defaults"


OmegaConf.register_new_resolver("fb_sweep_name", sweep_name, replace=True, use_cache=True)
OmegaConf.register_new_resolver("fb_job_name", job_name, replace=True)


def plugin_name(obj: object) -> str:
    """A plugin's `name` class attribute, else its class name in lower case."""
    return getattr(type(obj), "name", None) or type(obj).__name__.lower()


def build(node: DictConfig, kind: str, base: type) -> Any:
    """Instantiate a `_target_` node and check it implements the contract."""
    try:
        obj = hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        raise ConfigError(f"{kind} {node.get('_target_')!r} could not be built: {err}") from None
    if not isinstance(obj, base):
        raise ConfigError(
            f"{kind} {node.get('_target_')!r} is not a {base.__module__}.{base.__name__} subclass"
        )
    return obj


class Stages:
    """Wall time and peak memory of each stage of a job, for the job's metadata
    (`featbench.meta` in metrics.parquet) and `benchmarks/default_job.py`."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        self.records.append(
            {"stage": stage, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_kb / 1024}
        )


@cache
def _load_model_once(*args: Any) -> Any:
    """`load_model`, memoized per process: a sweep on the basic launcher runs every
    job in one process and loads the model once."""
    return load_model(*args)


def completed(job_dir: Path, chash: str) -> pd.DataFrame | None:
    """The job's table when `metrics.parquet` exists with this config hash, else None."""
    path = job_dir / METRICS_FILE
    if not path.exists():
        return None
    try:
        frame, _ = read_metrics(path)
    except Exception as err:  # unreadable: log it and run the job again (the file is replaced)
        log.warning("%s is unreadable (%s); running the job again", path, err)
        return None
    if frame.empty or set(frame["config_hash"].dropna().unique()) != {chash}:
        log.info("%s holds another configuration's results; running the job again", path)
        return None
    return frame


def run_job(
    cfg: DictConfig, job_dir: Path, group: str = "runs", name: str | None = None
) -> pd.DataFrame:
    """Run one job into `job_dir`; returns the tidy metrics table it wrote.

    A job whose `metrics.parquet` already holds this configuration's results is
    not run again unless `force=true`; W&B (or another tracker) gets one run per
    job in `group`.
    """
    started = time.perf_counter()
    validate(cfg)
    method: Method = build(cfg.method, "method", Method)
    tasks: dict[str, Task] = {}
    for key, node in cfg.task.items():
        if node is not None and "_target_" not in node:  # e.g. experiment=smoke's steering
            log.info("task.%s has settings but is not selected (task=...); ignored", key)
            continue
        tasks[key] = build(node, f"task {key}", Task)
    if not tasks:
        raise ConfigError("no task selected; choose at least one, e.g. task=[concept_detection]")
    judge = build(cfg.judge, "judge", Judge) if cfg.judge and cfg.judge.get("_target_") else None
    for key, task in tasks.items():
        if getattr(task, "needs_judge", False) and judge is None:
            raise ConfigError(f"task {key} needs a judge; choose judge=offline, openai or hf_chat")
    tracker = _build_tracker(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash(container)
    if cfg.force:
        shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)
    elif (done := completed(job_dir, chash)) is not None:
        log.info("skipped: %s already holds these results (force=true runs it again)", job_dir)
        return done
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        job_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redact(container)))
    )
    if tracker is not None:
        tracker.start(redact(container), job_dir, group, name or job_dir.name)
    try:
        frame, info = _run(cfg, job_dir, chash, method, tasks, judge, started)
    except BaseException:
        if tracker is not None:
            tracker.finish(failed=True)
        raise
    if tracker is not None:
        from bench.report import plot_job

        try:
            tracker.log_results(frame, plot_job(frame, job_dir / "plots", info))
        finally:
            tracker.finish(failed=False)
    return frame


def _build_tracker(cfg: DictConfig) -> Any:
    if not cfg.logger or not cfg.logger.get("_target_"):
        return None
    from bench.tracking import Tracker

    return build(cfg.logger, "logger", Tracker)


def _run(cfg, job_dir: Path, chash: str, method: Method, tasks, judge, started) -> tuple:
    """The job's work, stage by stage: its table, and the method's fit report."""
    stage = Stages()
    torch.manual_seed(cfg.seed)
    dataset = datasets.load(
        **{k: v for k, v in OmegaConf.to_container(cfg.dataset).items() if k != "name"}
    )
    if method.requires_labels and len(dataset.concepts) < 2:
        raise ConfigError(
            f"method {plugin_name(method)} needs at least two concepts; dataset has {dataset.concepts}"
        )
    for task in tasks.values():
        need = getattr(task, "min_concepts", 0)
        if len(dataset.concepts) < need:
            raise ConfigError(
                f"task {plugin_name(task)} needs at least {need} concepts besides neutral; "
                f"dataset has {dataset.concepts}"
            )
    with stage("load_model"):
        loaded = _load_model_once(
            cfg.model.name, cfg.model.source, cfg.model.path, cfg.device, cfg.dtype, cfg.model.n_ctx
        )
    model = loaded.model
    with stage("extract"):
        acts = activations.extract(
            model,
            dataset,
            cfg.layer,
            cfg.hook,
            model_fingerprint=loaded.fingerprint,
            batch_tokens=cfg.activations.batch_tokens,
            max_length=cfg.activations.max_length,
            dtype=cfg.activations.dtype,
        )
    train = acts.subset(dataset.indices("train"))
    with stage("fit"):
        features = method.fit(train)
    fit_seconds = stage.records[-1]["seconds"]
    features.info.setdefault("fit_seconds", fit_seconds)
    features.save(job_dir / "features")
    contexts = top_contexts(features, train, model.tokenizer)
    atomic_write_text(
        job_dir / "features" / "contexts.json", json.dumps(contexts, indent=1, ensure_ascii=False)
    )
    log.info(
        "%s: %d features fitted on %d tokens in %.1f s",
        plugin_name(method),
        len(features),
        len(train),
        fit_seconds,
    )

    data = TaskData(dataset, acts, cfg.layer, cfg.hook, cfg.seed, job_dir, judge, chash)
    run = {
        "run_id": f"{plugin_name(method)}-{chash[:10]}",
        "model": cfg.model.name,
        "layer": cfg.layer,
        "hook": acts.hook,
        "method": plugin_name(method),
        "seed": cfg.seed,
        "config_hash": chash,
    }
    tables = []
    for task in tasks.values():
        with stage(f"task:{plugin_name(task)}"):
            rows = task.evaluate(model, features, data, cfg)
        tables.append(finalize(rows, {**run, "task": plugin_name(task)}))
    frame = pd.concat(tables, ignore_index=True) if tables else finalize([], {**run, "task": ""})
    meta = {
        "overrides": _overrides(),
        "seconds": time.perf_counter() - started,
        "model_load_seconds": loaded.load_seconds,
        "stages": stage.records,
    }
    write_metrics(frame, job_dir / METRICS_FILE, meta)  # after `meta`: no stage of its own
    shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)  # the results hold it all now
    log.info("wrote %s (%d rows) in %.1f s", job_dir / METRICS_FILE, len(frame), meta["seconds"])
    return frame, features.info


def _overrides() -> list[str]:
    """The command-line overrides, with the values of secret-named keys redacted."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests calling run_job directly)
        return []
    redacted = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        secret = sep and is_secret_name(key.lstrip("+~").rsplit(".", 1)[-1])
        redacted.append(f"{key}={REDACTED}" if secret else item)
    return redacted


def headline(frame: pd.DataFrame) -> str:
    """The job's summary rows (no feature, no concept) as text: one block per task,
    one line per metric (and generator/noise where the task has them), with the
    95% interval where the task gives one."""
    summary = frame[frame["feature"].isna() & frame["concept"].isna()]
    if summary.empty:
        return "(no summary rows)"
    blocks = []
    for task, rows in summary.groupby("task", sort=False):
        dims = [c for c in ("generator", "noise") if c in rows and rows[c].notna().any()]
        lines = []
        for _, row in rows.iterrows():
            label = " ".join(str(row[c]) for c in ["metric", *dims])
            value = "missing" if pd.isna(row["value"]) else f"{row['value']:.4f}"
            if "ci_low" in row and pd.notna(row["ci_low"]):
                value += f"  [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            lines.append(f"  {label:<34} {value}")
        blocks.append(f"{task}\n" + "\n".join(lines))
    return "\n".join(blocks)


@hydra.main(version_base="1.3", config_path="pkg://bench.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            frame = run_job(cfg, job_dir)
        except USER_ERRORS as err:
            log.error("%s", err)
            sys.exit(2)
        log.info("results in %s\n%s", job_dir, headline(frame))
        return
    # In a sweep a failing job must not stop the others: the error is logged
    # (with its traceback when it is a bug), the job folder gets `failed.json`,
    # and the end-of-sweep callback reports the failures and sets the exit code.
    (job_dir / FAILED_FILE).unlink(missing_ok=True)
    group = Path(hydra_cfg.sweep.dir).name
    try:
        frame = run_job(cfg, job_dir, group=group, name=job_dir.name)
    except USER_ERRORS as err:
        log.error("job %s: %s", job_dir.name, err)
        _mark_failed(job_dir, err, exit_code=2)
        return
    except Exception as err:
        log.exception("job %s failed", job_dir.name)
        _mark_failed(job_dir, err, exit_code=1)
        return
    log.info("job %s done: %s\n%s", job_dir.name, job_dir, headline(frame))


def _mark_failed(job_dir: Path, err: BaseException, exit_code: int) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    record = {"error": f"{type(err).__name__}: {err}", "exit_code": exit_code}
    atomic_write_text(job_dir / FAILED_FILE, json.dumps(record))


def secret_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that set a secret-named key to a literal value.

    Hydra writes the command line to disk (multirun.yaml) and to its logs, so
    a secret given there would leak; `${oc.env:NAME}` keeps it in the
    environment, where it belongs.
    """
    found = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            continue
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        if is_secret_name(name) and not value.strip().startswith("${"):
            found.append(key)
    return found


def cli() -> None:
    """Console-script entry point."""
    leaked = secret_overrides(sys.argv[1:])
    if leaked:
        sys.stderr.write(
            f"featbench: {', '.join(leaked)} set on the command line; Hydra would save the value in "
            "its logs and sweep files. Put the secret in an environment variable and name the "
            "variable instead, e.g. 'judge.api_key_env=OPENAI_API_KEY' (the openai judge reads it).\n"
        )
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()

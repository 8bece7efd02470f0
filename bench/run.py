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
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from bench import activations, datasets
from bench import naming as _naming  # noqa: F401  (registers the folder-name resolvers)
from bench.config import validate
from bench.contexts import top_contexts
from bench.errors import ConfigError, FeatbenchError
from bench.judges.base import Judge
from bench.models import load_model, resolve_device
from bench.results import (
    FAILED_FILE,
    METRICS_FILE,
    REPLICATES_FILE,
    SEED_PLACEHOLDER,
    code_version,
    config_hash,
    finalize,
    pop_replicates,
    read_metrics,
    setting_hash,
    setting_of,
    write_metrics,
    write_replicates,
)
from bench.secrets import REDACTED, is_secret_name, looks_like_secret, redact, redact_text
from bench.storage import atomic_write_text, sha256_json
from methods.base import Method
from tasks.base import Task, TaskData

log = logging.getLogger(__name__)

# Errors a user can fix: shown as one line, no traceback (anything else is a bug).
USER_ERRORS = (FeatbenchError, FloatingPointError)
CHECKPOINTS = "checkpoints"  # per-job folder of partial task results (steering, per feature)


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


def completed(job_dir: Path, chash: str, version: str) -> pd.DataFrame | None:
    """The job's table when `metrics.parquet` holds results of this config hash made
    by this code version, else None (with a log line saying why it runs again)."""
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
    found = sorted(frame["code_version"].dropna().unique()) if "code_version" in frame else []
    if found != [version]:
        log.info(
            "%s: results from %s, code is now %s; running the job again",
            path, ", ".join(found) or "code that recorded no version", version,
        )  # fmt: skip
        return None
    return frame


class Identity(NamedTuple):
    """What a job is: its resolved config, its setting (the config without the seed,
    as flat keys) and their hashes."""

    config: dict
    setting: dict
    config_hash: str
    setting_hash: str


def job_identity(cfg: DictConfig) -> Identity:
    """The job's identity, with `device=auto` resolved to the device actually used
    (so a CPU result is never taken for a GPU run's). The setting resolves the config
    with the seed replaced by a placeholder, so values interpolated from it drop out."""
    with open_dict(cfg):
        cfg.device = resolve_device(cfg.device)
    container = OmegaConf.to_container(cfg, resolve=True)
    seedless = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # untyped copy
    seedless.seed = SEED_PLACEHOLDER
    setting = OmegaConf.to_container(seedless, resolve=True)
    return Identity(container, setting_of(setting), config_hash(container), setting_hash(setting))


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
        if task.needs_judge and judge is None:
            raise ConfigError(f"task {key} needs a judge; choose judge=offline, openai or hf_chat")
        task.check_judge(judge)
    tracker = _build_tracker(cfg)
    identity = job_identity(cfg)
    container, chash = identity.config, identity.config_hash
    if cfg.force:
        shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)
    elif (done := completed(job_dir, chash, code_version())) is not None:
        log.info("skipped: %s already holds these results (force=true runs it again)", job_dir)
        return done
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        job_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redact(container)))
    )
    if tracker is not None:
        tracker.start(redact(container), job_dir, group, name or job_dir.name)
    try:
        frame, info = _run(cfg, job_dir, identity, method, tasks, judge, started)
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


def _run(cfg, job_dir: Path, identity: Identity, method: Method, tasks, judge, started) -> tuple:
    """The job's work, stage by stage: its table, and the method's fit report."""
    chash = identity.config_hash
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
        for warning in task.check_dataset(dataset):
            log.warning("task %s: %s", plugin_name(task), warning)
        need = task.min_concepts
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
    # Task checkpoints are keyed by the config and the code: a resumed job never takes
    # another code version's partial results.
    checkpoint_key = sha256_json([chash, code_version()])[:16]
    data = TaskData(dataset, acts, cfg.layer, cfg.hook, cfg.seed, job_dir, judge, checkpoint_key)
    with stage("encode"):  # once per job: the contexts and every task share these codes
        encodings = data.encodings(features)
        codes = encodings.tokens()[encodings.rows(dataset.indices("train"))]
        contexts = top_contexts(features, train, model.tokenizer, codes=codes)
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

    run = {
        "run_id": f"{plugin_name(method)}-{chash[:10]}",
        "model": cfg.model.name,
        "layer": cfg.layer,
        "hook": acts.hook,
        "method": plugin_name(method),
        "seed": cfg.seed,
        "config_hash": chash,
        "setting_hash": identity.setting_hash,
        "code_version": code_version(),
        "dataset_hash": dataset.content_hash[:16],
        "dataset_version": dataset.version,
    }
    tables, replicates = [], {}
    for key, task in tasks.items():  # key: the config's task key (one task may run twice)
        with stage(f"task:{key}"):
            rows = task.evaluate(model, features, data, cfg)
        replicates.update(pop_replicates(rows, key))
        tables.append(finalize(rows, {**run, "task": plugin_name(task)}))
    frame = pd.concat(tables, ignore_index=True) if tables else finalize([], {**run, "task": ""})
    meta = {
        "setting": identity.setting,
        "overrides": _overrides(),
        "seconds": time.perf_counter() - started,
        "model_load_seconds": loaded.load_seconds,
        "stages": stage.records,
    }
    (job_dir / REPLICATES_FILE).unlink(missing_ok=True)  # never beside another run's metrics
    write_replicates(job_dir / REPLICATES_FILE, replicates)  # before the metrics that point at it
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
        redacted.append(f"{key}={REDACTED}" if secret else redact_text(item))
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
        dims = [c for c in ("encoder", "generator", "noise") if c in rows and rows[c].notna().any()]
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
    record = {"error": redact_text(f"{type(err).__name__}: {err}"), "exit_code": exit_code}
    atomic_write_text(job_dir / FAILED_FILE, json.dumps(record))


def secret_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that put a secret in a literal value: a secret-named key
    (`judge.api_key=...`), a value that looks like a key (`judge.api_key_env=sk-...`, a
    plausible slip), or a URL with credentials in it (`https://user:key@host/v1`).

    Hydra writes the command line to disk (multirun.yaml) and to its logs, so a secret
    given there would leak; `${oc.env:NAME}` keeps it in the environment, where it belongs.
    """
    found = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or value.strip().startswith("${"):
            continue
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        if is_secret_name(name) or looks_like_secret(value):
            found.append(key)
    return found


def cli() -> None:
    """Console-script entry point."""
    leaked = secret_overrides(sys.argv[1:])
    if leaked:
        sys.stderr.write(
            f"featbench: {', '.join(leaked)} set on the command line to a secret (a key, a "
            "token, or a URL with credentials); Hydra would save it in its logs and sweep "
            "files. Keep it in an environment variable: name the variable where a key is "
            "read (e.g. 'judge.api_key_env=OPENAI_API_KEY'), or interpolate it "
            "(e.g. 'judge.base_url=${oc.env:JUDGE_URL}').\n"
        )
        sys.exit(2)
    sys.exit(run_main())


def run_main() -> int:
    """Run the Hydra app; a configuration error (a bad override, an unknown option or key, a
    value of the wrong type) is exit code 2 with Hydra's message, as featbench's own config
    checks are; exit code 1 stays for bugs, which keep their traceback.

    Hydra reports its own errors and exits 1; HYDRA_FULL_ERROR=1 makes it raise them
    instead, so it is set for the duration of the call (and restored): this is the entry
    point of the process, and the user's own HYDRA_FULL_ERROR=1 still gets the full trace.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    wanted = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        if wanted == "1":
            raise
        cause = err.__cause__
        more = f"\n{cause}" if isinstance(cause, OmegaConfBaseException) else ""
        sys.stderr.write(f"featbench: configuration error: {err}{more}\n")
        return 2
    finally:
        if wanted is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = wanted
    return 0


if __name__ == "__main__":
    cli()

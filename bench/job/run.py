"""One featbench job: model x layer x hook x method x seed, from config to metrics.parquet.

`run_job` is the order of work: validate the config and build the method and task objects
(cheap, so mistakes surface before anything slow), skip the job when its folder already
holds this config's results from this code (under a per-job lock, so two identical sweeps
started together compute each job once), load the dataset, the model and the cached
activations, fit the method on the train split, encode once (`TaskData.encodings`), run
each task, and write `metrics.parquet` (atomically) beside a redacted `config.yaml` and
the fitted features. A folder that refuses the results keeps nothing half-written: the
finished results go to `rescue_dir` and the error names it.

The command line around it (Hydra, exit codes, secrets on the command line) is
`bench.run`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
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
from omegaconf import DictConfig, OmegaConf, open_dict

from bench import activations, datasets
from bench.config import validate
from bench.contexts import top_contexts
from bench.errors import ConfigError, FeatbenchError
from bench.job_checks import (
    check_judge_failures,
    check_rank,
    completed,
    plugin_name,
    refuse_misspelled_target,
)
from bench.judges.base import Judge
from bench.models import ModelSource, load_model, resolve_device
from bench.results import (
    FAILED_FILE,
    METRICS_FILE,
    REPLICATES_FILE,
    SEED_PLACEHOLDER,
    ResultsError,
    code_digest,
    code_version,
    config_hash,
    finalize,
    pop_replicates,
    setting_hash,
    setting_of,
    write_metrics,
    write_replicates,
)
from bench.secrets import REDACTED, is_secret_name, redact, redact_text
from bench.stages import Stages
from bench.storage import atomic_write_text, entry_lock, sha256_json, using_cache
from featbench.methods.base import Method
from featbench.tasks.base import Task, TaskData

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # per-job folder of partial task results (steering, per feature)
JOB_LOCK = ".featbench-job"  # entry_lock's `<name>.lock` in the job folder: one runner at a time


def build(node: DictConfig, kind: str, base: type) -> Any:
    """Instantiate a `_target_` node and check it implements the contract."""
    try:
        obj = hydra.utils.instantiate(node, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, FeatbenchError):  # the plugin's own clear message
            raise err.__cause__ from None
        raise ConfigError(f"{kind} {node.get('_target_')!r} could not be built: {err}") from None
    if not isinstance(obj, base):
        raise ConfigError(
            f"{kind} {node.get('_target_')!r} is not a {base.__module__}.{base.__name__} subclass"
        )
    return obj


@cache
def _load_model_once(*args: Any) -> Any:
    """`load_model`, memoized per process: a sweep on the basic launcher runs every
    job in one process and loads the model once."""
    return load_model(*args)


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
    with using_cache(cfg.paths.get("cache_dir")):  # the job's caches, scoped to the job
        return _run_job(cfg, job_dir, group, name)


def _run_job(cfg: DictConfig, job_dir: Path, group: str, name: str | None) -> pd.DataFrame:
    started = time.perf_counter()
    validate(cfg)
    method: Method = build(cfg.method, "method", Method)
    tasks: dict[str, Task] = {}
    for key, node in cfg.task.items():
        if node is not None and "_target_" not in node:  # e.g. experiment=smoke's steering
            refuse_misspelled_target(node, f"task.{key}")
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
    source: ModelSource = build(cfg.model.source, "model.source", ModelSource)
    checked = source.check(cfg.model.name)  # an offline hub model: said now, not after the fit
    if judge is not None and any(task.needs_judge for task in tasks.values()):
        judge.check_reachable()  # one request now, not hours of work judged by nobody
    tracker = _build_tracker(cfg)
    identity = job_identity(cfg)
    job_dir.mkdir(parents=True, exist_ok=True)
    # One process at a time per job folder: a second identical sweep waits here, then
    # finds the results and skips (force=true reruns after the wait, as asked).
    plan = Plan(identity, method, tasks, judge, source, checked)
    with entry_lock(job_dir / JOB_LOCK):
        return _run_locked(cfg, job_dir, plan, tracker, group, name, started)


class Plan(NamedTuple):
    """A job as checked before its lock: what it is, its plugins (the model's source among
    them), and what `source.check` answered (the hub's: whether the hub itself answered)."""

    identity: Identity
    method: Method
    tasks: dict[str, Task]
    judge: Judge | None
    source: ModelSource
    checked: bool


def _run_locked(cfg, job_dir, plan: Plan, tracker, group, name, started) -> pd.DataFrame:
    container, chash = plan.identity.config, plan.identity.config_hash
    if cfg.force:
        shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)
    elif (done := completed(job_dir, chash, code_digest())) is not None:
        log.info("skipped: %s already holds these results (force=true runs it again)", job_dir)
        return done
    atomic_write_text(
        job_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(redact(container)))
    )
    if tracker is not None:
        tracker.start(redact(container), job_dir, group, name or job_dir.name)
    (job_dir / FAILED_FILE).unlink(missing_ok=True)  # this run decides afresh
    try:
        with seeded(cfg.seed, cfg.device):  # the job's randomness, scoped to the job
            frame, info = _run(cfg, job_dir, plan, started)
        check_judge_failures(frame, cfg.judge_failure_limit, job_dir)
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


@contextmanager
def seeded(seed: int, device: str) -> Iterator[None]:
    """torch's global random generators seeded with `seed` for the block, then put back.

    Inside, a job draws what `torch.manual_seed(seed)` would give it (methods or tasks
    that call `torch.randn` without a generator rely on that, and results stay those of
    a process-wide seed); after it, the caller's random state is as it was (the next job
    of a sweep, a notebook, a test). A CPU job seeds only the CPU generator, so a GPU the
    job never uses is neither initialised nor reseeded; a CUDA job seeds and restores
    every visible GPU's, as `torch.manual_seed` seeds them all. Other accelerators (MPS)
    are seeded as `torch.manual_seed` does but not restored: torch has no fork for them.
    """
    kind = str(device).split(":", 1)[0]
    gpus = list(range(torch.cuda.device_count())) if kind == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"):
        if kind == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        yield


def _build_tracker(cfg: DictConfig) -> Any:
    if not cfg.logger or not cfg.logger.get("_target_"):
        return None
    from bench.tracking import Tracker

    return build(cfg.logger, "logger", Tracker)


def _run(cfg, job_dir: Path, plan: Plan, started: float) -> tuple[pd.DataFrame, dict]:
    """The job's work, stage by stage: its table, and the method's fit report."""
    identity, method, tasks, judge = plan.identity, plan.method, plan.tasks, plan.judge
    chash = identity.config_hash
    stage = Stages()
    dataset = build(cfg.dataset, "dataset", datasets.ConceptDataset)
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
    check_rank(method, cfg, dataset)
    with stage("load_model"):
        loaded = _load_model_once(
            cfg.model.name, plan.source, cfg.device, cfg.dtype, cfg.model.n_ctx, plan.checked
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
    features.save(job_dir / "features", provenance={
        "model": cfg.model.name, "model_fingerprint": loaded.fingerprint, "layer": cfg.layer,
        "hook": acts.hook, "dataset_hash": dataset.content_hash[:16],
        "dataset_version": dataset.version, "config_hash": chash,
        "setting_hash": identity.setting_hash, "code_version": code_version(),
        "code_digest": code_digest(),
    })  # fmt: skip
    # Task checkpoints are keyed by the config and the code identity: a resumed job never
    # takes partial results of code that computes differently.
    checkpoint_key = sha256_json([chash, code_digest()])[:16]
    data = TaskData(dataset, acts, cfg.layer, cfg.hook, cfg.seed, job_dir, judge, checkpoint_key,
                    stage=stage)  # fmt: skip
    with stage("encode"):  # once per job: the contexts and every task share these codes
        encodings = data.encodings(features)
        codes = encodings.tokens()[encodings.rows(dataset.indices("train"))]
        contexts = top_contexts(features, train, model.tokenizer, codes=codes)
    atomic_write_text(
        job_dir / "features" / "contexts.json", json.dumps(contexts, ensure_ascii=False)
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
        "code_digest": code_digest(),
        "dataset_hash": dataset.content_hash[:16],
        "dataset_version": dataset.version,
    }
    tables, replicates = [], {}
    for key, task in tasks.items():  # key: the config's task key (one task may run twice)
        with stage(f"task:{key}"):
            rows = task.evaluate(model, features, data, cfg)
        replicates.update(pop_replicates(rows, key))
        table = finalize(rows, {**run, "task": plugin_name(task)})
        # one source for "supervised": the method's declaration (the report marks it †)
        tables.append(table.assign(supervised=method.requires_labels))
    frame = pd.concat(tables, ignore_index=True) if tables else finalize([], {**run, "task": ""})
    meta = {
        "setting": identity.setting,
        # what the report needs to know about each task (bench.report reads it from here)
        "tasks": {plugin_name(task): type(task).declaration() for task in tasks.values()},
        "overrides": _overrides(),
        "seconds": time.perf_counter() - started,
        "model_load_seconds": loaded.load_seconds,
        "stages": stage.records,
    }
    try:
        _write_results(job_dir, frame, replicates, meta)
    except (ResultsError, OSError) as err:  # a full or read-only disk: keep the finished work
        rescue = rescue_dir(job_dir, chash)
        _write_results(rescue, frame, replicates, meta)
        raise ResultsError(
            f"cannot write the results of {job_dir}: {getattr(err, 'strerror', None) or err}. "
            f"The finished results were saved to {rescue} instead; copy that folder into place "
            "(or free space) and run the sweep again to find them"
        ) from err
    shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)  # the results hold it all now
    log.info("wrote %s (%d rows) in %.1f s", job_dir / METRICS_FILE, len(frame), meta["seconds"])
    return frame, features.info


def _write_results(folder: Path, frame: pd.DataFrame, replicates: dict, meta: dict) -> None:
    """The replicates, then the metrics that point at them, atomically, into `folder`."""
    (folder / REPLICATES_FILE).unlink(missing_ok=True)  # never beside another run's metrics
    write_replicates(folder / REPLICATES_FILE, replicates)
    write_metrics(frame, folder / METRICS_FILE, meta)


def rescue_dir(job_dir: Path, chash: str) -> Path:
    """Where a job's finished results go when its own folder cannot take them: the system's
    temporary folder, named by the job and its config hash."""
    return Path(tempfile.gettempdir()) / "featbench-rescued" / f"{job_dir.name}-{chash[:10]}"


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

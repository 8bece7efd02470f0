"""The stages of one job's work, in order, each a function with a name: the dataset, the
model, the activations, the fit, the shared encoding, the tasks, and the results written.
`work` runs them; `bench.job.run` decides whether the job runs at all."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench import activations
from bench.activations import ActivationSet
from bench.core.secrets import REDACTED, is_secret_name, redact_text
from bench.core.stages import Stages
from bench.core.storage import atomic_write_text, sha256_json
from bench.data import datasets
from bench.errors import ConfigError
from bench.fit.checks import check_fitted
from bench.fit.contexts import top_contexts
from bench.fit.features import Features
from bench.fit.method import Method
from bench.job.checks import check_rank
from bench.job.identity import Identity
from bench.job.plugins import build, plugin_name
from bench.judges.base import Judge
from bench.models import LoadedModel, ModelSource, load_model
from bench.results import (
    METRICS_FILE,
    REPLICATES_FILE,
    ResultsError,
    code_digest,
    code_version,
    finalize,
    pop_replicates,
    write_metrics,
    write_replicates,
)
from bench.tasks.base import Task, TaskData

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # per-job folder of partial task results (steering, per unit)


class Plan(NamedTuple):
    """A job as checked before its lock: what it is, its plugins (the model's source among
    them), and what `source.check` answered (the hub's: whether the hub itself answered)."""

    identity: Identity
    method: Method
    tasks: dict[str, Task]
    judge: Judge | None
    source: ModelSource
    checked: bool


def work(cfg: DictConfig, job_dir: Path, plan: Plan, started: float) -> tuple[pd.DataFrame, dict]:
    """The job's work, stage by stage: its table, and the method's fit report."""
    stage = Stages()
    dataset = load_dataset(cfg, plan)
    with stage("load_model"):
        loaded = _load_model_once(
            cfg.model.name, plan.source, cfg.device, cfg.dtype, cfg.model.n_ctx, plan.checked
        )
    with stage("extract"):
        acts = extract(cfg, loaded, dataset)
    train = acts.subset(dataset.indices("train"))
    with stage("fit"):
        features = plan.method.fit(train)
    fit_seconds = stage.records[-1]["seconds"]
    save_features(cfg, plan, loaded, dataset, features, train, job_dir, fit_seconds)
    data = TaskData(
        dataset=dataset,
        activations=acts,
        seed=cfg.seed,
        output_dir=job_dir,
        judge=plan.judge,
        checkpoint_key=checkpoint_key(plan),
        stage=stage,
    )
    with stage("encode"):  # once per job: the contexts and every task share these codes
        encode(data, features, train, loaded, job_dir)
    frame, replicates = evaluate(cfg, plan, loaded, features, data, stage)
    meta = {
        "setting": plan.identity.setting,
        # what the report needs to know about each task (bench.report reads it from here)
        "tasks": {plugin_name(task): type(task).declaration() for task in plan.tasks.values()},
        "overrides": command_line(),
        "seconds": time.perf_counter() - started,
        "model_load_seconds": loaded.load_seconds,
        "stages": stage.records,
    }
    write(job_dir, frame, replicates, meta, plan.identity.config_hash)
    log.info("wrote %s (%d rows) in %.1f s", job_dir / METRICS_FILE, len(frame), meta["seconds"])
    return frame, features.info


def load_dataset(cfg: DictConfig, plan: Plan) -> datasets.ConceptDataset:
    """The dataset plugin, checked against what the method and every task need."""
    dataset = build(cfg.dataset, "dataset", datasets.ConceptDataset)
    method = plan.method
    if method.requires_labels and len(dataset.concepts) < 2:
        raise ConfigError(
            f"method {plugin_name(method)} needs at least two concepts; dataset has "
            f"{dataset.concepts}"
        )
    for task in plan.tasks.values():
        for warning in task.check_dataset(dataset):
            log.warning("task %s: %s", plugin_name(task), warning)
        need = task.min_concepts
        if len(dataset.concepts) < need:
            raise ConfigError(
                f"task {plugin_name(task)} needs at least {need} concepts besides neutral; "
                f"dataset has {dataset.concepts}"
            )
    check_rank(method, cfg, dataset)
    return dataset


@cache
def _load_model_once(*args: Any) -> LoadedModel:
    """`load_model`, memoized per process: a sweep on the basic launcher runs every job in
    one process and loads the model once."""
    return load_model(*args)


def extract(cfg: DictConfig, loaded: LoadedModel, dataset) -> ActivationSet:
    """Every sentence's activations at the job's hook, from the cache once extracted."""
    return activations.extract(
        loaded.model,
        dataset,
        cfg.layer,
        cfg.hook,
        model_fingerprint=loaded.fingerprint,
        batch_tokens=cfg.activations.batch_tokens,
        max_length=cfg.activations.max_length,
        dtype=cfg.activations.dtype,
    )


def save_features(
    cfg, plan: Plan, loaded, dataset, features: Features, train, job_dir: Path, fit_seconds: float
) -> None:
    """Check what the fit returned, then save it with where it came from."""
    method = plan.method
    check_fitted(plugin_name(method), features, train)
    features.info.setdefault("fit_seconds", fit_seconds)
    features.save(
        job_dir / "features",
        provenance={
            "model": cfg.model.name,
            "model_fingerprint": loaded.fingerprint,
            "layer": cfg.layer,
            "hook": train.hook,
            "dataset_hash": dataset.content_hash[:16],
            "dataset_version": dataset.version,
            "config_hash": plan.identity.config_hash,
            "setting_hash": plan.identity.setting_hash,
            "code_version": code_version(),
            "code_digest": code_digest(),
        },
    )
    log.info(
        "%s: %d features fitted on %d tokens in %.1f s",
        plugin_name(method),
        len(features),
        len(train),
        fit_seconds,
    )


def checkpoint_key(plan: Plan) -> str:
    """Task checkpoints are keyed by the config and the code identity: a resumed job never
    takes partial results of code that computes differently."""
    return sha256_json([plan.identity.config_hash, code_digest()])[:16]


def encode(data: TaskData, features: Features, train, loaded, job_dir: Path) -> None:
    """The job's codes (every task shares them) and the features' top contexts."""
    encodings = data.encodings(features)
    codes = encodings.tokens()[encodings.rows(data.dataset.indices("train"))]
    contexts = top_contexts(features, train, loaded.model.tokenizer, codes=codes)
    atomic_write_text(
        job_dir / "features" / "contexts.json", json.dumps(contexts, ensure_ascii=False)
    )


def evaluate(cfg, plan: Plan, loaded, features, data: TaskData, stage: Stages) -> tuple:
    """Every task's rows with the run's columns (one table), and their bootstrap replicates."""
    method, dataset = plan.method, data.dataset
    run = {
        "run_id": f"{plugin_name(method)}-{plan.identity.config_hash[:10]}",
        "model": cfg.model.name,
        "layer": cfg.layer,
        "hook": data.activations.hook,
        "method": plugin_name(method),
        "seed": cfg.seed,
        "config_hash": plan.identity.config_hash,
        "setting_hash": plan.identity.setting_hash,
        "code_version": code_version(),
        "code_digest": code_digest(),
        "dataset_hash": dataset.content_hash[:16],
        "dataset_version": dataset.version,
    }
    tables, replicates = [], {}
    for key, task in plan.tasks.items():  # key: the config's task key (one task may run twice)
        with stage(f"task:{key}"):
            rows = task.evaluate(loaded.model, features, data, cfg)
        replicates.update(pop_replicates(rows, key))
        table = finalize(rows, {**run, "task": plugin_name(task)})
        # one source for "supervised": the method's declaration (the report marks it †)
        tables.append(table.assign(supervised=method.requires_labels))
    frame = pd.concat(tables, ignore_index=True) if tables else finalize([], {**run, "task": ""})
    return frame, replicates


def write(job_dir: Path, frame: pd.DataFrame, replicates: dict, meta: dict, chash: str) -> None:
    """The results into the job's folder, atomically; a folder that refuses them keeps
    nothing half-written, and the finished results go to `rescue_dir` instead."""
    try:
        _write_results(job_dir, frame, replicates, meta)
    except (ResultsError, OSError) as err:  # a full or read-only disk: keep the finished work
        rescue = rescue_dir(job_dir, chash)
        _write_results(rescue, frame, replicates, meta)
        raise ResultsError(
            f"cannot write the results of {job_dir}: {getattr(err, 'strerror', None) or err}. "
            f"The finished results were saved to {rescue} instead; copy that folder into place "
            "(or free space) and run the sweep again to find them",
            rescued=rescue,
        ) from err
    shutil.rmtree(job_dir / CHECKPOINTS, ignore_errors=True)  # the results hold it all now


def _write_results(folder: Path, frame: pd.DataFrame, replicates: dict, meta: dict) -> None:
    """The replicates, then the metrics that point at them, atomically, into `folder`."""
    (folder / REPLICATES_FILE).unlink(missing_ok=True)  # never beside another run's metrics
    write_replicates(folder / REPLICATES_FILE, replicates)
    write_metrics(frame, folder / METRICS_FILE, meta)


def rescue_dir(job_dir: Path, chash: str) -> Path:
    """Where a job's finished results go when its own folder cannot take them: the system's
    temporary folder, named by the job and its config hash."""
    return Path(tempfile.gettempdir()) / "featbench-rescued" / f"{job_dir.name}-{chash[:10]}"


def command_line() -> list[str]:
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

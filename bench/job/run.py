"""One featbench job: model x layer x hook x method x seed, from config to metrics.parquet.

`run_job` is the order of work: validate the config and build the method and task objects
(cheap, so mistakes surface before anything slow), skip the job when its folder already
holds this config's results from this code (under a per-job lock, so two identical sweeps
started together compute each job once), then the stages of `bench.job.stages` (dataset,
model, activations, fit, encode, tasks, results), and last the tracker (W&B), a side
channel that never fails the job. A folder that refuses the results keeps nothing
half-written: the finished results go to `rescue_dir` and the error names it.

The command line around it (Hydra, exit codes, secrets on the command line) is
`bench.cli.featbench`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from bench.core.secrets import redact
from bench.core.storage import atomic_write_text, entry_lock, using_cache
from bench.errors import ConfigError, error_line
from bench.fit.method import Method
from bench.job.checks import check_judge_failures, completed, refuse_misspelled_target
from bench.job.config import validate
from bench.job.identity import job_identity, seeded
from bench.job.plugins import build
from bench.job.stages import CHECKPOINTS, Plan, rescue_dir, work
from bench.judges.base import Judge
from bench.models import ModelSource
from bench.results import FAILED_FILE, code_digest
from bench.tasks.base import Task

__all__ = ["run_job", "rescue_dir", "mirror"]

log = logging.getLogger(__name__)

JOB_LOCK = ".featbench-job"  # entry_lock's `<name>.lock` in the job folder: one runner at a time


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
    if "seed" in cfg.method:
        raise ConfigError(
            f"method.seed={cfg.method.seed}: a method's seed is the run's seed; set seed=N "
            "(the job hands it to the method, and every task gets it as TaskData.seed)"
        )
    method: Method = build(cfg.method, "method", Method).seeded(cfg.seed)
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
            frame, info = work(cfg, job_dir, plan, started)
        check_judge_failures(frame, cfg.judge_failure_limit, job_dir)
    except BaseException:
        if tracker is not None:
            tracker.finish(failed=True)
        raise
    if tracker is not None:
        mirror(tracker, frame, job_dir, info)
    return frame


def mirror(tracker: Any, frame: pd.DataFrame, job_dir: Path, info: dict) -> None:
    """The finished job on the tracker (W&B), a side channel that never fails the job: its
    plots (a plot that cannot be drawn is a warning, and the rest is still sent), its
    results, and the run closed."""
    from bench.report import plot_job

    try:
        plots = plot_job(frame, job_dir / "plots", info)
    except Exception as err:  # results are written; the side channel goes on without plots
        log.warning(
            "plots for the tracker not made (%s); the results are unaffected",
            error_line(err),
            exc_info=True,
        )
        plots = []
    try:
        tracker.log_results(frame, plots)
    finally:
        tracker.finish(failed=False)


def _build_tracker(cfg: DictConfig) -> Any:
    if not cfg.logger or not cfg.logger.get("_target_"):
        return None
    from bench.job.tracking import Tracker

    return build(cfg.logger, "logger", Tracker)

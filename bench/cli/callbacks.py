"""Hydra callbacks: a sweep that reports on itself.

`ReportCallback` logs one line as each job starts and, when a multirun ends, builds
`featbench-report` in the sweep folder and logs the headline comparison table: a row per
setting, the held-out steering score first, `*` on each cell whose difference from the
`random` setting excludes 0 (from the report's difference table). Enable it
in a config with

    hydra:
      callbacks:
        report:
          _target_: bench.callbacks.ReportCallback

A report that cannot be built is logged as an error. Jobs that failed (their folders
hold `failed.json`, written by `bench.run.main`) are listed at the end, and the callback
raises `bench.errors.SweepFailed` with their exit code (2 for a configuration or data
error, 1 for a bug), which `featbench` returns, so scripts and CI see a sweep with
failures as a failure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bench.errors import FeatbenchError, SweepFailed
from bench.report import build, comparison_table, read_reference, write_report
from bench.report.common import one_line
from bench.results import FAILED_FILE, METRICS_FILE

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Progress lines per job and the sweep's report when the multirun ends."""

    def __init__(self, compare: str | None = None, top: int = 5) -> None:
        """`compare`: `paper` or a reference CSV to put beside ours (default None: none);
        `top`: features per job in features.md (default 5, as featbench-report)."""
        self.compare = compare
        self.top = max(int(top), 1)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Log `job <num>: <overrides>` so a sweep's console shows its progress."""
        num = OmegaConf.select(config, "hydra.job.num", default=None)
        if num is None:  # a single run (hydra.mode=RUN): nothing to count
            return
        overrides = OmegaConf.select(config, "hydra.job.override_dirname", default=None)
        log.info("job %s: %s", num, overrides or "defaults")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Build the report in `hydra.sweep.dir`; log the comparison table and report.md;
        then exit non-zero when any job of the sweep failed."""
        sweep = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep is None:
            log.error("featbench-report skipped: the config has no hydra.sweep.dir")
            return
        directory = Path(str(sweep))
        self._report(directory)
        failed = sorted(directory.glob(f"*/{FAILED_FILE}"))
        if failed:
            codes = []
            for path in failed:
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    record = {"error": "(unreadable failed.json)", "exit_code": 1}
                codes.append(int(record.get("exit_code", 1)))
                log.error("failed job %s: %s", path.parent.name, record.get("error"))
            log.error("%d job(s) of the sweep failed; re-running the sweep retries only them",
                      len(failed))  # fmt: skip
            raise SweepFailed(max(codes), len(failed))

    def _report(self, directory: Path) -> None:
        if not directory.is_dir() or not any(directory.rglob(METRICS_FILE)):
            log.error(
                "featbench-report skipped: no job wrote %s under %s (did every job fail?)",
                METRICS_FILE,
                directory,
            )
            return
        try:
            reference = read_reference(self.compare) if self.compare else None
            built = build(directory)
            path = write_report(built, directory, reference, self.top)
            table = comparison_table(built.cells, built.differences)
        except FeatbenchError as err:
            log.error("featbench-report on %s failed: %s", directory, one_line(err))
            return
        except Exception:  # a bug in the report must not turn a finished sweep into a failure
            log.exception("featbench-report on %s failed unexpectedly", directory)
            return
        log.info("headline metrics of %s:\n%s", directory, table)
        log.info("report: %s", path)

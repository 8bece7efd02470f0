"""Hydra callbacks: a sweep that reports on itself.

`ReportCallback` logs one line as each job starts and, when a multirun ends, builds
`featbench-report` in the sweep folder and logs the headline comparison table: a row per
setting, the held-out steering score first, `*` on each cell whose difference from the
`random` setting excludes 0 (from the report's difference table). Enable it
in a config with

    hydra:
      callbacks:
        report:
          _target_: bench.cli.callbacks.ReportCallback

Jobs that failed (their folders hold `failed.json`; a job whose folder refused it has a
record in the sweep folder's `.featbench-failed/` instead, both written by
`bench.cli.featbench`) are listed at the end, with where any rescued results went. A
report that cannot be built is an error too: the jobs' results stay where they are, and
the sweep fails. Either way the callback raises `bench.errors.SweepFailed` with the worst
exit code (2 for a configuration or data error, 1 for a bug), which `featbench` returns,
so scripts and CI see a sweep with failures as a failure.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bench.errors import FeatbenchError, SweepFailed, error_line
from bench.report import build, comparison_table, read_reference, write_report
from bench.results import FAILED_FILE, FAILED_LEDGER, METRICS_FILE

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

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Clear the sweep's ledger of failures: this run records its own."""
        sweep = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep is not None:
            shutil.rmtree(Path(str(sweep)) / FAILED_LEDGER, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Build the report in `hydra.sweep.dir`; log the comparison table and report.md;
        then exit non-zero when any job of the sweep failed or the report could not be
        built."""
        sweep = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep is None:
            log.error("featbench-report skipped: the config has no hydra.sweep.dir")
            return
        directory = Path(str(sweep))
        report_code = self._report(directory)
        records = failure_records(directory)
        for name, record in records.items():
            rescued = (
                f"; its finished results are in {record['rescued']}"
                if record.get("rescued")
                else ""
            )
            log.error("failed job %s: %s%s", name, record.get("error"), rescued)
        if records:
            log.error(
                "%d job(s) of the sweep failed; re-running the sweep retries only them",
                len(records),
            )
        codes = [int(r.get("exit_code", 1)) for r in records.values()] + [report_code]
        if max(codes) > 0:
            raise SweepFailed(max(codes), len(records))

    def _report(self, directory: Path) -> int:
        """Build the report: 0 when done, else the exit code its failure deserves (2 for
        an error the user can fix, 1 for a bug), with the error logged."""
        if not directory.is_dir() or not any(directory.rglob(METRICS_FILE)):
            log.error(
                "featbench-report skipped: no job wrote %s under %s (did every job fail?)",
                METRICS_FILE,
                directory,
            )
            return 0  # the failed jobs carry the verdict
        try:
            reference = read_reference(self.compare) if self.compare else None
            built = build(directory)
            path = write_report(built, directory, reference, self.top)
            table = comparison_table(built.cells, built.differences)
        except FeatbenchError as err:
            log.error(
                "featbench-report on %s failed: %s; the jobs' results are kept under %s",
                directory,
                error_line(err),
                directory,
            )
            return 2
        except Exception as err:  # a bug in the report: the sweep fails, its jobs' results stay
            log.exception(
                "featbench-report on %s failed: %s; the jobs' results are kept under %s",
                directory,
                error_line(err),
                directory,
            )
            return 1
        log.info("headline metrics of %s:\n%s", directory, table)
        log.info("report: %s", path)
        return 0


def failure_records(directory: Path) -> dict[str, dict]:
    """job name -> its failure record: `failed.json` in the job folders, then the ledger of
    jobs whose folder refused it. An unreadable record counts as a bug's failure."""
    found: dict[str, dict] = {}
    paths = [(p.parent.name, p) for p in sorted(directory.glob(f"*/{FAILED_FILE}"))]
    paths += [(p.stem, p) for p in sorted((directory / FAILED_LEDGER).glob("*.json"))]
    for name, path in paths:
        try:
            found[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found[name] = {"error": f"(unreadable {path})", "exit_code": 1}
    return found

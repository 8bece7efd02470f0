"""Wall time and peak memory of each stage of a job, for the job's metadata
(`featbench.meta` in metrics.parquet, key `stages`), `benchmarks/` and per-stage tables
(docs/running-sweeps.md, "Per-stage time and memory"). A task times its own stages through `TaskData.stage`."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stages:
    """A list of stage records: `with stages("fit"): ...` appends {stage, seconds,
    peak_rss_mb}, plus whatever the block adds to the record it is given (e.g. the
    tokens a generation stage produced)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    @contextmanager
    def __call__(self, stage: str) -> Iterator[dict]:
        start = time.perf_counter()
        record: dict = {"stage": stage}
        yield record
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        record.update(seconds=time.perf_counter() - start, peak_rss_mb=peak_kb / 1024)
        self.records.append(record)

    def seconds(self, stage: str) -> float:
        """Total seconds of the records named `stage`."""
        return sum(r["seconds"] for r in self.records if r["stage"] == stage)

"""`featbench-report DIR`: a sweep's results merged into one table, a report, plots and
per-feature pages.

    featbench-report results/multirun/2026-01-01_00-00-00
    featbench-report DIR --compare paper     # beside the SNMF paper's numbers

Every input is read first; then each output is written atomically into DIR:

- `summary.parquet`: every row of every `metrics.parquet` under DIR with all columns
  (the union of the jobs' extra columns), plus `job_dir`, the job folder relative to DIR;
- `report.md`: per (model, layer, hook), one table per task with a row per method and
  the task's headline summary metrics (rows with no feature and no concept); a cell
  with several runs shows their mean and n;
- `steering_vs_kl.png`, `auroc_by_method.png`, `snmf_loss.png`, each skipped with one
  log line when its data is absent; hierarchical SNMF trees as indented lists;
- `features.md`: per job, its top features with their description, top-activating
  contexts (the job's `features/contexts.json`) and steered samples.

This module reads the inputs and assembles the outputs; the parts live beside it:
`tables` (headline tables, the console `comparison_table`, the paper comparison),
`plots` (PNGs, `plot_job` for one job, SNMF trees), `pages` (features.md) and `common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa

from bench.errors import FeatbenchError
from bench.report.common import (
    MISSING,
    Job,
    ReportError,
    arrow_safe,
    natural,
    one_line,
    read_json,
    supervised_methods,
)
from bench.report.pages import features_page
from bench.report.plots import plot_job, plot_section, tree_section
from bench.report.tables import (
    HEADLINES,
    compare_section,
    comparison_table,
    headline_cells,
    headline_tables,
)
from bench.results import METRICS_FILE, read_metrics, write_metrics
from bench.storage import atomic_write_text

__all__ = [
    "HEADLINES",
    "MISSING",
    "PAPER_REFERENCE",
    "Job",
    "ReportError",
    "cli",
    "collect",
    "comparison_table",
    "features_page",
    "headline_cells",
    "load_jobs",
    "plot_job",
    "read_reference",
    "report",
]

log = logging.getLogger(__name__)

PAPER_REFERENCE = Path(__file__).resolve().parents[2] / "results" / "paper_reference.csv"
REFERENCE_COLUMNS = ["model", "layer", "method", "metric", "value", "source", "confidence"]


def report(directory: Path, compare: str | None = None, top: int = 5) -> Path:
    """Build every output of `featbench-report` in `directory`; returns report.md's path."""
    directory = Path(directory)
    reference = read_reference(compare) if compare else None
    summary = collect(directory)
    jobs = load_jobs(summary, directory)
    supervised = supervised_methods(summary)
    cells = headline_cells(summary)
    sections = [
        _intro(summary, directory, supervised),
        headline_tables(summary, cells, supervised),
        compare_section(cells, reference) if reference is not None else "",
        plot_section(summary, jobs, directory, supervised),
        tree_section(jobs),
    ]
    meta = {"report_of": sorted(summary["job_dir"].unique())}
    write_metrics(summary, directory / "summary.parquet", meta)
    atomic_write_text(directory / "features.md", features_page(jobs, top))
    path = atomic_write_text(directory / "report.md", "\n\n".join(filter(None, sections)) + "\n")
    log.info("wrote %s, features.md and summary.parquet (%d rows)", path, len(summary))
    return path


def collect(directory: Path) -> pd.DataFrame:
    """Every metrics.parquet under `directory` in one table, with a `job_dir` column."""
    if not directory.is_dir():
        raise ReportError(f"{directory}: {'not a' if directory.exists() else 'no such'} directory")
    paths = sorted(directory.rglob(METRICS_FILE), key=natural)
    if not paths:
        raise ReportError(f"{directory}: no {METRICS_FILE} under it; run featbench into it first")
    frames = []
    for path in paths:
        try:
            frame, _ = read_metrics(path)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ReportError(f"{path}: unreadable metrics file ({one_line(err)})") from None
        frame["job_dir"] = path.parent.relative_to(directory).as_posix()
        frames.append(frame)
    summary = pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)
    log.info("%s: %d jobs, %d rows", directory, len(paths), len(summary))
    return arrow_safe(summary)


def load_jobs(summary: pd.DataFrame, directory: Path) -> list[Job]:
    """Per job folder in `summary`, its rows and its features' side files (when readable)."""
    jobs = []
    for name, rows in summary.groupby("job_dir", sort=False):
        side = directory / str(name) / "features"
        meta, contexts = read_json(side / "features.json"), read_json(side / "contexts.json")
        info = meta.get("info") if isinstance(meta, dict) else None
        info = info if isinstance(info, dict) else {}
        contexts = contexts if isinstance(contexts, list) else None
        jobs.append(Job(str(name), str(rows["method"].iloc[0]), rows, info, contexts))
    return jobs


def read_reference(compare: str) -> pd.DataFrame:
    """The paper's numbers: `paper` is results/paper_reference.csv, else a CSV path."""
    path = PAPER_REFERENCE if compare == "paper" else Path(compare)
    if not path.is_file():
        columns = ", ".join(REFERENCE_COLUMNS)
        raise ReportError(f"--compare {compare}: {path} does not exist (a CSV of {columns})")
    try:
        reference = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: unreadable CSV ({one_line(err)})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in reference]
    if missing:
        raise ReportError(f"{path}: lacks columns {missing}; expected {REFERENCE_COLUMNS}")
    return reference


def _intro(summary: pd.DataFrame, directory: Path, supervised: set[str]) -> str:
    """report.md's heading and how to read its cells."""
    text = (
        f"# featbench report\n\n`{directory}`: {summary['job_dir'].nunique()} jobs, "
        f"{len(summary)} result rows, all in [summary.parquet](summary.parquet). "
        "Per-feature pages: [features.md](features.md).\n\n"
        "Cells are a task's summary rows (no feature, no concept): `v [lo, hi]` is a value "
        "with its 95% bootstrap interval, `m (n=k)` the mean over k runs (seeds) of one "
        f"setting, {MISSING} a missing value (its `reason` is in summary.parquet)."
    )
    if supervised:
        text += (
            f"\n\n† supervised ({', '.join(sorted(supervised))}): DiffMean is fitted with the "
            "concept labels on the same train split, so its numbers are an upper reference "
            "for the unsupervised methods, not a competitor."
        )
    return text


def cli(argv: list[str] | None = None) -> None:
    """Console-script entry point: `featbench-report DIR [--compare paper] [--top N]`."""
    parser = argparse.ArgumentParser(prog="featbench-report", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="a job or sweep folder (searched recursively)")
    parser.add_argument("--compare", metavar="paper|CSV", help="add the paper's reference numbers")
    parser.add_argument("--top", type=int, default=5, help="features per job in features.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = report(args.directory, args.compare, max(args.top, 1))
    except FeatbenchError as err:
        sys.stderr.write(f"featbench-report: {one_line(err)}\n")
        sys.exit(2)
    print(path)  # the CLI's one line of stdout: where the report is

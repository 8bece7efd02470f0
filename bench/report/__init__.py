"""`featbench-report DIR`: a sweep's results merged into one table, a report, plots and
per-feature pages.

    featbench-report results/multirun/2026-01-01_00-00-00
    featbench-report DIR --compare paper     # beside the SNMF paper's numbers

Every input is read first; then each output is written atomically into DIR:

- `summary.parquet`: every row of every `metrics.parquet` under DIR with all columns
  (the union of the jobs' extra columns), plus `job_dir` (the job folder relative to DIR),
  `setting_hash` and `setting`, the label of the row's setting;
- `differences.parquet`: for every pair of settings in one table (same model, layer, hook
  and dataset), per headline metric, the paired (or, saying so, unpaired) bootstrap
  difference, Holm-adjusted per table (bench.report.differences);
- `report.md`: per (model, layer, hook), one table per task with a row per setting and the
  task's headline summary metrics; a cell is one setting, averaged over seeds only;
  then the difference tables;
- `steering_vs_kl.png`, `auroc_by_method.png`, `snmf_loss.png`, each skipped with one
  log line when its data is absent; hierarchical SNMF trees as indented lists;
- `features.md`: per job, its top features with their description, top-activating
  contexts (the job's `features/contexts.json`) and steered samples;
- `index.html`: the same as one self-contained page that loads nothing (bench.report.html):
  the comparison, the concept view, a feature gallery per job and the SNMF trees.

The data flows one way: `build` reads the jobs (`collect`), names their settings and makes
the cells (`cells`), their differences (`differences`) and what the plots and the paper
comparison show (`series`); `write_report` renders them (`tables`, `paper`, `plots`,
`pages`, `html`), and no renderer computes a number.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow as pa

from bench.core.storage import atomic_write_text
from bench.errors import FeatbenchError
from bench.report.cells import assign_settings, declarations, headline_cells
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
from bench.report.differences import differences, differences_section
from bench.report.html import write_html
from bench.report.pages import features_page
from bench.report.paper import compare_section, packaged_reference
from bench.report.paper import read_reference as _read_reference
from bench.report.plots import plot_job, plot_section, tree_section
from bench.report.ranking import ranking_section
from bench.report.series import PlotSeries, feature_means, plot_series
from bench.report.tables import comparison_table, headline_tables
from bench.results import (
    METRICS_FILE,
    REPLICATES_FILE,
    read_metrics,
    read_replicates,
    write_metrics,
)

__all__ = [
    "MISSING",
    "PAPER_REFERENCE",
    "Built",
    "Job",
    "ReportError",
    "build",
    "cli",
    "collect",
    "comparison_table",
    "features_page",
    "headline_cells",
    "load_jobs",
    "plot_job",
    "read_reference",
    "report",
    "write_report",
]

log = logging.getLogger(__name__)

PAPER_REFERENCE = packaged_reference()  # results/paper_reference.csv, installed as package data


class Built(NamedTuple):
    """Everything the outputs are rendered from."""

    summary: pd.DataFrame  # every row, with job_dir, setting_hash and setting
    settings: dict[str, dict | None]  # setting_hash -> its keys (None: a job from older code)
    cells: pd.DataFrame  # bench.report.cells.headline_cells
    differences: pd.DataFrame  # bench.report.differences.COLUMNS
    jobs: list[Job]
    series: PlotSeries  # what the plots draw (bench.report.series.plot_series)
    feature_means: pd.DataFrame  # per-feature means the paper comparison shows
    # (item, why) left out of the report: unreadable metrics or replicates, task declarations
    left_out: tuple[tuple[str, str], ...] = ()


def report(directory: Path, compare: str | None = None, top: int = 5) -> Path:
    """Build every output of `featbench-report` in `directory`; returns report.md's path."""
    directory = Path(directory)
    reference = read_reference(compare) if compare else None
    return write_report(build(directory), directory, reference, top)


def build(directory: Path) -> Built:
    """Read every job under `directory` and compute the cells and their differences."""
    directory = Path(directory)
    summary, metas, left_out = collect(directory, with_meta=True)
    summary, settings = assign_settings(summary, metas)
    replicates = {}
    for name in summary["job_dir"].unique():
        try:
            replicates[str(name)] = read_replicates(directory / str(name))
        except (pa.ArrowException, OSError, ValueError) as err:
            why = (
                f"unreadable ({one_line(err)}): its cells have no intervals from replicates "
                "and no paired differences"
            )
            log.warning("%s/%s: %s", name, REPLICATES_FILE, why)
            left_out.append((f"{name}/{REPLICATES_FILE}", why))
            replicates[str(name)] = {}
    declared, undeclared = declarations(metas, settings)
    cells = headline_cells(summary, replicates, declared)
    return Built(
        summary,
        settings,
        cells,
        differences(cells),
        load_jobs(summary, directory),
        plot_series(summary, cells),
        feature_means(summary),
        tuple(left_out + undeclared),
    )


def write_report(
    built: Built, directory: Path, reference: pd.DataFrame | None = None, top: int = 5
) -> Path:
    """Render `built` into `directory`: summary.parquet, differences.parquet, report.md,
    features.md, ranking.md (when the jobs steered) and the plots; returns report.md's
    path."""
    directory = Path(directory)
    summary, cells, diffs = built.summary, built.cells, built.differences
    supervised = supervised_methods(summary)
    compared = (
        compare_section(cells, built.feature_means, built.settings, reference)
        if reference is not None
        else ""
    )
    sections = [
        _intro(summary, directory, supervised, built.left_out),
        headline_tables(cells, diffs),
        differences_section(diffs, cells),
        compared,
        plots := plot_section(built.series, built.jobs, directory),
        tree_section(built.jobs),
    ]
    meta = {"report_of": sorted(summary["job_dir"].unique())}
    write_metrics(summary, directory / "summary.parquet", meta)
    write_metrics(diffs, directory / "differences.parquet", meta)
    atomic_write_text(directory / "features.md", features_page(built.jobs, top))
    ranking = ranking_section(cells, diffs, summary)
    if ranking:  # the settings by the steering headline, and every pair's differences
        atomic_write_text(directory / "ranking.md", ranking)
    write_html(built, directory, plots)
    path = atomic_write_text(directory / "report.md", "\n\n".join(filter(None, sections)) + "\n")
    log.info(
        "wrote %s, features.md, summary.parquet (%d rows) and differences.parquet (%d)",
        path,
        len(summary),
        len(diffs),
    )
    return path


def collect(directory: Path, with_meta: bool = False):
    """Every readable metrics.parquet under `directory` in one table, with a `job_dir` column
    (and, `with_meta`, job_dir -> that file's featbench meta, and the (file, reason) of each
    unreadable one). An unreadable file is left out with a warning naming it; the report is
    refused only when no file is readable."""
    if not directory.is_dir():
        raise ReportError(f"{directory}: {'not a' if directory.exists() else 'no such'} directory")
    paths = sorted(directory.rglob(METRICS_FILE), key=natural)
    if not paths:
        raise ReportError(f"{directory}: no {METRICS_FILE} under it; run featbench into it first")
    frames, metas, unreadable = [], {}, []
    for path in paths:
        name = path.parent.relative_to(directory).as_posix()
        try:
            frame, meta = read_metrics(path)
        except (pa.ArrowException, OSError, ValueError) as err:
            why = f"unreadable metrics file ({one_line(err)})"
            log.warning("%s: %s; left out of the report", path, why)
            unreadable.append((f"{name}/{METRICS_FILE}", why))
            continue
        frame["job_dir"] = name
        metas[name] = meta.get("meta") if isinstance(meta.get("meta"), dict) else {}
        frames.append(frame)
    if not frames:
        listing = "; ".join(f"{file}: {why}" for file, why in unreadable)
        raise ReportError(f"{directory}: no readable {METRICS_FILE} ({listing})")
    summary = pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)
    log.info("%s: %d jobs, %d rows", directory, len(frames), len(summary))
    summary = arrow_safe(summary)
    return (summary, metas, unreadable) if with_meta else summary


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
    """The paper's numbers: `paper` is the packaged results/paper_reference.csv, else a CSV."""
    return _read_reference(compare, PAPER_REFERENCE)


def _intro(
    summary: pd.DataFrame,
    directory: Path,
    supervised: set[str],
    left_out: tuple[tuple[str, str], ...] = (),
) -> str:
    """report.md's heading, what was left out, and how to read its cells."""
    text = (
        f"# featbench report\n\n`{directory}`: {summary['job_dir'].nunique()} jobs, "
        f"{len(summary)} result rows, all in [summary.parquet](summary.parquet). "
        "Per-feature pages: [features.md](features.md); the settings ranked by the steering "
        "headline, with every pair's differences: [ranking.md](ranking.md) (when the jobs "
        "steered).\n\n"
        "A row is one setting (a job's config minus its seed and output paths), named by its "
        "method and the keys that vary between the table's rows. A cell is a task's summary "
        "row (no feature, no concept): `v [lo, hi] n=N` is a value with its 95% bootstrap "
        "interval over N units; `k seeds`: the mean over k seeds of that one setting, its "
        "interval from the seeds' averaged bootstrap replicates. "
        f"{MISSING} is a missing value (its `reason` is in summary.parquet); `*` marks a cell "
        "whose difference from the `random` setting excludes 0."
    )
    if left_out:
        text += f"\n\n**{len(left_out)} item(s) left out:**\n\n"
        text += "\n".join(f"- `{item}`: {why}" for item, why in left_out)
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

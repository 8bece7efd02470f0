"""index.html: the report as one self-contained page, the comparison first.

`write_html` renders a `bench.report.Built` into `DIR/index.html`, atomically:

1. the comparison: per (model, layer, hook), per task, the headline table (a row per
   setting, each cell its text with its 95% interval drawn as a bar), the difference table
   (which settings separate from which) and the plots, embedded as data: URIs;
2. the concept view (`html_views.concept_section`), when the concept-paired protocol ran;
3. the feature gallery (`html_features.gallery_section`);
4. hierarchical SNMF trees (`html_views.tree_section`), when a job has one.

The page makes no network request (no CDN, no web font; its Content-Security-Policy allows
nothing but inline style, inline script and data: images), so it opens from the file system.
Every text is escaped. A little vanilla JS filters by method, concept and score, and opens
the feature or concept a permalink (the URL hash) names. Nothing is recomputed here: the
cells' texts and the differences are rendered as `build` made them.
"""

from __future__ import annotations

import base64
import logging
import re
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from bench.core.storage import atomic_write_text
from bench.report.common import (
    MISSING,
    code_identities,
    mixed_kinds,
    num,
    supervised_methods,
    task_order,
)
from bench.report.differences import UNPAIRED, differs_from_control, mark_key, separates
from bench.report.html_assets import SCRIPT, STYLE
from bench.report.html_features import complete, gallery_section, setting_of
from bench.report.html_views import concept_section, tree_section

if TYPE_CHECKING:
    from bench.report import Built

log = logging.getLogger(__name__)

PAGE = "index.html"
LIMIT = 5_000_000  # bytes; a page above it is written with a warning
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
PLOT_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")  # plot_section's markdown image links


def write_html(built: Built, directory: Path, plots: str = "") -> Path:
    """Write `directory/index.html`; `plots`: plot_section's markdown (the PNGs it drew)."""
    directory = Path(directory)
    page = html_page(built, directory, PLOT_LINK.findall(plots))
    path = atomic_write_text(directory / PAGE, page)
    size = len(page.encode("utf-8"))
    if size > LIMIT:
        log.warning(
            "%s is %.1f MB, above the %.0f MB a page should stay under",
            path,
            size / 1e6,
            LIMIT / 1e6,
        )
    log.info("wrote %s (%.2f MB)", path, size / 1e6)
    return path


def html_page(built: Built, directory: Path, plots: list[tuple[str, str]]) -> str:
    """The whole page: comparison, concepts, features and trees, then the script."""
    summary = built.summary
    jobs = sorted(
        (complete(job) for job in built.jobs), key=lambda j: (j.method, setting_of(j), j.name)
    )
    sections = {
        "comparison": comparison_section(built, directory, plots),
        "concepts": concept_section(jobs),
        "features": gallery_section(jobs),
        "hierarchy": tree_section(jobs),
    }
    nav = " ".join(f'<a href="#{k}">{k}</a>' for k, v in sections.items() if v)
    methods = sorted({job.method for job in jobs})
    concepts = sorted({str(c) for c in summary["concept"].dropna()}) if "concept" in summary else []
    intro = (
        f"{escape(str(directory))}: {summary['job_dir'].nunique()} jobs, {len(summary)} "
        "result rows (summary.parquet), report.md and features.md beside this page."
    )
    if built.left_out:
        intro += f" <strong>{len(built.left_out)} item(s) left out:"
        intro += "".join(f" {escape(item)} ({escape(why)});" for item, why in built.left_out)
        intro += "</strong>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,"><title>featbench report</title>'
        f"<style>{STYLE}</style></head><body>"
        f'<header class="top"><h1>featbench report</h1><nav>{nav}</nav>{_filters(methods, concepts)}'
        f'</header><main><p class="note">{intro}</p>{"".join(sections.values())}</main>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def _filters(methods: list[str], concepts: list[str]) -> str:
    """The filter bar: method, concept, and a minimum of one score."""

    def select(name: str, values: list[str]) -> str:
        options = "".join(f'<option value="{escape(v)}">{escape(v)}</option>' for v in values)
        return f'<select id="filter-{name}" aria-label="{name}"><option value="">every {name}</option>{options}</select>'

    scores = [("auroc", "AUROC"), ("steering", "held-out steering score"), ("scd", "S_CD")]
    score = "".join(f'<option value="{k}">{v}</option>' for k, v in scores)
    return (
        f'<div class="filters">{select("method", methods)} {select("concept", concepts)} '
        f'<select id="filter-score" aria-label="score">{score}</select> ≥ '
        '<input id="filter-min" type="number" step="0.05" placeholder="any" aria-label="minimum"> '
        '<button type="button" id="filter-clear">clear</button> '
        '<span id="filter-count" class="note"></span></div>'
    )


def comparison_section(built: Built, directory: Path, plots: list[tuple[str, str]]) -> str:
    """Headline tables, the difference tables, then the plots."""
    cells, diffs = built.cells, built.differences
    marks = differs_from_control(diffs) if len(diffs) else set()
    parts = [
        '<section id="comparison"><h2>Comparison</h2>',
        '<p class="note">A row is one setting, a cell the task\'s summary row: value '
        "[95% bootstrap interval] n=units (the bar draws the interval on the column's "
        "scale); <i>k seeds</i>: the mean of k seeds of one setting. "
        f"{MISSING}: missing (its reason is in summary.parquet). * marks a cell whose "
        "difference from the random control excludes 0; † a supervised method (fitted "
        "with the concept labels: an upper reference, not a competitor).</p>",
    ]
    supervised = supervised_methods(built.summary)
    for where, block in cells.groupby("place", sort=False):
        parts.append(f"<h3>{escape(str(where).replace('`', ''))}</h3>")
        for task in _tasks(block):
            title = str(block.loc[block["task"] == task, "title"].iloc[0])
            parts.append(
                f"<h4>{escape(title)}</h4>{_warnings(block[block['task'] == task])}"
                f"{_headline_table(block[block['task'] == task], block, marks, supervised)}"
            )
    parts.append(differences_html(diffs))
    parts.append(_plots(directory, plots))
    return "\n".join(parts) + "</section>"


def _headline_table(
    part: pd.DataFrame, block: pd.DataFrame, marks: set, supervised: set[str]
) -> str:
    """A row per setting of the block, a column per headline label of the task."""
    labels = list(dict.fromkeys(part.sort_values("order")["label"]))
    settings = block.drop_duplicates("setting_hash").sort_values(["method", "setting"])
    scale = {label: _scale(part[part["label"] == label]) for label in labels}
    head = "".join(f"<th>{escape(str(label))}</th>" for label in labels)
    body = []
    for setting in settings.to_dict("records"):
        ours = part[part["setting_hash"] == setting["setting_hash"]]
        cells = {str(c["label"]): c for c in ours.to_dict("records")}
        tds = "".join(_cell(cells.get(str(label)), scale[label], marks) for label in labels)
        dagger = " †" if setting["method"] in supervised else ""
        body.append(
            f'<tr data-method="{escape(str(setting["method"]))}">'
            f"<th>{escape(str(setting['setting']) + dagger)}</th>{tds}</tr>"
        )
    return (
        f'<table class="headline"><thead><tr><th>setting</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _cell(cell: dict | None, scale: tuple[float, float] | None, marks: set) -> str:
    """A cell's text (as the cells table wrote it), its mark and its interval bar."""
    if cell is None:
        return f"<td>{MISSING}</td>"
    mark = " *" if mark_key(cell, cell["setting"]) in marks else ""
    return f"<td>{escape(str(cell['text']) + mark)}{_bar(cell, scale)}</td>"


def _bar(row: dict, scale: tuple[float, float] | None) -> str:
    """The interval [ci_low, ci_high] and the value drawn on `scale` (lo, hi)."""
    if scale is None or pd.isna(row.get("value")):
        return ""
    lo, hi = scale

    def at(v: float) -> float:
        return round(100 * (float(v) - lo) / (hi - lo), 1)

    span = ""
    if pd.notna(row.get("ci_low")) and pd.notna(row.get("ci_high")):
        left, right = at(row["ci_low"]), at(row["ci_high"])
        span = f'<i class="ci" style="left:{left}%;width:{max(right - left, 0.5)}%"></i>'
    zero = f'<i class="zero" style="left:{at(0)}%"></i>' if lo < 0 < hi else ""
    return (
        f'<span class="bar">{zero}{span}<i class="pt" style="left:{at(row["value"])}%"></i></span>'
    )


def _scale(rows: pd.DataFrame) -> tuple[float, float] | None:
    """A column's drawing range: its values and intervals, and 0."""
    values = pd.concat([rows[c] for c in ("value", "ci_low", "ci_high") if c in rows])
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return None
    lo, hi = min(0.0, float(values.min())), max(0.0, float(values.max()))
    return (lo, hi) if hi - lo > 1e-12 else None


def differences_html(diffs: pd.DataFrame) -> str:
    """Per (model, layer, hook): which settings separate from which, then every pair."""
    head = (
        '<h3>Differences between settings</h3><p class="note">For every pair of settings in '
        "one table, per headline metric: delta = a − b with its 95% bootstrap interval "
        "(paired over the units both were scored on, else unpaired), p Holm-adjusted over "
        "the table's family. Highlighted rows separate: their interval excludes 0. "
        '<label><input type="checkbox" id="only-separated"> only those</label></p>'
    )
    if diffs.empty:
        return head + '<p class="note">No two settings share a table, dataset and metric.</p>'
    parts = [head]
    for _, block in diffs.groupby(["model", "layer", "hook"], dropna=False, sort=False):
        first = block.iloc[0]
        rows = block.to_dict("records")
        scale = _scale(block.rename(columns={"delta": "value"}))
        separated = [
            f"{r['setting_a']} {'>' if r['delta'] > 0 else '<'} {r['setting_b']} on {_metric(r)}"
            for r in rows
            if separates(r)
        ]
        summary = "; ".join(separated) if separated else "no pair separates"
        header = ["metric", "a", "b", "delta [95% CI]", "p_holm", "pairs", "comparison", "power"]
        body = "".join(_difference_row(r, scale) for r in rows)
        parts.append(
            f"<h4>{escape(str(first['model']))} · layer {escape(str(first['layer']))} · "
            f"{escape(str(first['hook']))}</h4><p><b>Separated:</b> {escape(summary)}</p>"
            f'<table class="differences"><thead><tr>{"".join(f"<th>{h}</th>" for h in header)}'
            f"</tr></thead><tbody>{body}</tbody></table>"
        )
    return "\n".join(parts)


def _difference_row(row: dict, scale: tuple[float, float] | None) -> str:
    delta = num(row["delta"])
    if pd.notna(row["ci_low"]):
        delta += f" [{num(row['ci_low'])}, {num(row['ci_high'])}]"
    paired = pd.notna(row["paired"]) and bool(row["paired"])
    how = f"paired over {row['paired_over']}" if paired else UNPAIRED
    power = MISSING
    if separates(row):
        power = "separated"
    elif pd.notna(row["n_for_power"]):
        power = f"{int(row['n_for_power'])} units for 80% power"
    p = MISSING if pd.isna(row["p_holm"]) else f"{row['p_holm']:.3g}"
    cells = [_metric(row), row["setting_a"], row["setting_b"]]
    tds = "".join(f"<td>{escape(str(c))}</td>" for c in cells)
    bar = _bar({"value": row["delta"], "ci_low": row["ci_low"], "ci_high": row["ci_high"]}, scale)
    tds += f"<td>{escape(delta)}{bar}</td>"
    pairs = MISSING if pd.isna(row["n_pairs"]) else str(row["n_pairs"])
    tds += "".join(f"<td>{escape(c)}</td>" for c in (p, pairs, how, power))
    return f'<tr class="{"sep" if separates(row) else "same"}">{tds}</tr>'


def _metric(row: dict) -> str:
    return row["metric"] if pd.isna(row["encoder"]) else f"{row['metric']} ({row['encoder']})"


def _plots(directory: Path, plots: list[tuple[str, str]]) -> str:
    """The PNGs plot_section drew, embedded (a page that loads nothing)."""
    figures = []
    for title, name in plots:
        path = directory / name
        if not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img alt="{escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(title)} ({escape(name)})</figcaption></figure>"
        )
    return '<h3>Plots</h3><div class="plots">' + "".join(figures) + "</div>" if figures else ""


def _tasks(cells: pd.DataFrame) -> list[str]:
    """The tasks present, in their declared report order."""
    return task_order(cells)


def _warnings(part: pd.DataFrame) -> str:
    """What a reader must know before comparing a table's rows: mixed code identities, steering
    cells judged against different description kinds."""
    notes = []
    versions = code_identities(part)
    if len(versions) > 1:
        notes.append(
            f"These rows mix results from {len(versions)} code identities: {'; '.join(versions)}."
        )
    kinds = mixed_kinds(part)
    if kinds:
        notes.append(
            f"These steering cells were judged against different description kinds "
            f"({', '.join(kinds)}); their scores are not comparable."
        )
    return "".join(f'<p class="warning">{escape(n)}</p>' for n in notes)

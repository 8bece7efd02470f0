"""The report's tables: per (model, layer, hook), per task, a row per setting with the task's
headline summary metrics, as markdown for report.md (`headline_tables`) or fixed-width text
for a terminal (`comparison_table`, logged at the end of a sweep).

Both render cells (bench.report.cells.headline_cells) and the difference table
(bench.report.differences): nothing is recomputed here. A cell whose difference from the
`random` control excludes 0 is marked `*`; a table whose rows come from several code identities,
or whose steering cells were judged against different description kinds, says so above it.
"""

from __future__ import annotations

import logging

import pandas as pd

from bench.report.common import MISSING, code_identities, md_table, mixed_kinds, task_order
from bench.report.differences import differs_from_control, mark_key

log = logging.getLogger(__name__)

GAP = "  "  # between the columns of the console table
MARK = "*"
LEGEND = f"{MARK} differs from random: 95% CI of the paired difference excludes 0"
LEGEND += " (unpaired where the two were not scored on the same units)"
SUPERVISED = "† supervised: fitted with the concept labels, an upper reference"
ARROWS = {True: " ↑", False: " ↓"}  # a column's declared direction: which way is better


def headline_tables(cells: pd.DataFrame, diffs: pd.DataFrame) -> str:
    """report.md's tables: per (model, layer, hook), per task, a row per setting."""
    marks = differs_from_control(diffs)
    parts = []
    for where, block in cells.groupby("place", sort=False):
        parts.append(f"## {where}")
        for task in _tasks(block):
            part = block[block["task"] == task]
            header, body = _rows(part, marks, rows=block)
            notes = _notes(part)
            title = f"### {part['title'].iloc[0]}"
            parts.append("\n\n".join([title, *notes, md_table(header, body)]))
    if marks:
        parts.append(LEGEND)
    return "\n\n".join(parts)


def comparison_table(cells: pd.DataFrame, diffs: pd.DataFrame | None = None) -> str:
    """The headline numbers as fixed-width text: per (model, layer, hook), a row per setting
    and a column per headline metric of every task, the held-out steering score first.

    A cell is `value [ci_low, ci_high] n=N` (and `k seeds`), — when missing; `*` marks a
    difference from the `random` setting that excludes 0, † a supervised method.
    """
    if cells.empty:
        return "(no result rows)"
    diffs = diffs if diffs is not None else pd.DataFrame(columns=["method_b"])
    marks = differs_from_control(diffs) if len(diffs) else set()
    parts = []
    for where, block in cells.groupby("place", sort=False):
        header, body = _rows(block, marks, describe=False)
        notes = [n.replace("**", "") for n in _notes(block)]
        parts.append("\n".join([where.replace("`", ""), *notes, _fixed_width(header, body)]))
    legend = [LEGEND] if marks else []
    legend += [SUPERVISED] if cells["supervised"].any() else []
    return "\n\n".join(parts) + "".join(f"\n{line}" for line in legend)


def _rows(
    part: pd.DataFrame, marks: set, describe: bool = True, rows: pd.DataFrame | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and body: a row per setting of `rows` (default: of `part`), a column per
    (task, label) of `part` in the tasks' declared order; steering tables (report.md) also show the
    description kind and the judge."""
    columns, arrows = [], {}
    for task in _tasks(part):
        mine = part[part["task"] == task].sort_values("order")
        columns += [(task, label) for label in dict.fromkeys(mine["label"])]
        arrows.update(
            {
                (task, c["label"]): ARROWS.get(c["higher_is_better"], "")
                for c in mine.to_dict("records")
            }
        )
    steering = describe and set(part["task"]) == {"steering"}
    header = [
        "setting",
        *(label + arrows.get(key, "") for key, (_, label) in zip(columns, columns, strict=True)),
    ]
    directions = set(part.get("direction", pd.Series(dtype=str)).dropna()) - {"", "feature"}
    header += ["description", "judge"] + (["direction"] if directions else []) if steering else []
    rows = part if rows is None else rows
    settings = rows.drop_duplicates("setting_hash").sort_values(["method", "setting"])
    body = []
    for setting in settings.to_dict("records"):
        ours = part[part["setting_hash"] == setting["setting_hash"]]
        texts = {}
        for cell in ours.to_dict("records"):
            mark = f" {MARK}" if mark_key(cell, cell["setting"]) in marks else ""
            texts.setdefault((cell["task"], cell["label"]), cell["text"] + mark)
        name = f"{setting['setting']}{' †' * bool(setting['supervised'])}"
        row = [name, *(texts.get(c, MISSING) for c in columns)]
        if steering:
            kinds = ", ".join(sorted(set(ours["description"].dropna().astype(str))))
            row += [kinds or MISSING, _judged_by(ours)]
            if directions:
                row.append(", ".join(sorted({d for d in ours["direction"].dropna() if d})))
        body.append(row)
    return header, body


def _judged_by(cells: pd.DataFrame) -> str:
    """The judge as its label names it (model and endpoint), and what a failed judgement
    counted as when that was 0 (the paper's policy) rather than a missing value."""
    column = "judge_label" if "judge_label" in cells and cells["judge_label"].any() else "judge"
    text = ", ".join(sorted({j for j in cells[column].dropna() if j})) or MISSING
    if "judge_failure_policy" in cells and cells["judge_failure_policy"].eq("zero").any():
        text += " (failed judgements scored 0)"
    return text


def _notes(part: pd.DataFrame) -> list[str]:
    """Warnings printed above a table: mixed code identities, mixed description kinds."""
    notes = []
    versions = code_identities(part)
    if len(versions) > 1:
        notes.append(
            f"**These rows mix results from {len(versions)} code identities: "
            f"{'; '.join(versions)}.** Rerun the older jobs to compare like with like."
        )
    kinds = mixed_kinds(part)
    if kinds:
        notes.append(
            f"**WARNING: these steering cells were judged against different "
            f"description kinds ({', '.join(kinds)}); their scores are not comparable: each "
            f"kind has its own columns, and no steering difference across kinds is computed.**"
        )
    return notes


def _tasks(cells: pd.DataFrame) -> list[str]:
    """The tasks present in `cells`, in their declared report order (then by name)."""
    return task_order(cells)


def _fixed_width(header: list[str], body: list[list[str]]) -> str:
    """Left-aligned columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join(
        GAP.join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )

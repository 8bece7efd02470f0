"""Differences between settings: for every pair of settings in one table (same model, layer,
hook and dataset_hash), per headline metric (+ encoder), `bench.stats.difference` of the two
cells' estimates, Holm-adjusted over the table's whole family.

The comparison is paired when both cells were scored on the same units (equal `units_hash`
and replicates of equal length): their bootstrap replicates come from the same resamples and
are subtracted resample by resample. Otherwise it is an unpaired bootstrap of independent
units, and the row says so. Steering cells judged against different description kinds are
never compared (their scores are not on one scale).

`differences` computes the table once; `differences_section` and the console table's marks
(`separates`) only render it.
"""

from __future__ import annotations

import logging
from itertools import combinations

import pandas as pd

from bench.report.cells import BLOCK, DEFAULT_PROTOCOL, estimate
from bench.report.common import MISSING, md_table, mixed_kinds, num
from bench.stats import difference, holm

log = logging.getLogger(__name__)

COLUMNS = [
    "model",
    "layer",
    "hook",
    "metric",
    "encoder",
    "protocol",
    "description",  # the steering cells' description kind (one per comparison)
    "method_a",
    "setting_a",
    "method_b",
    "setting_b",
    "delta",
    "ci_low",
    "ci_high",
    "p_holm",
    "n_pairs",
    "paired_over",
    "paired",
    "n_for_power",
]
TYPES = {
    "layer": "Int64",
    "delta": "Float64",
    "ci_low": "Float64",
    "ci_high": "Float64",
    "p_holm": "Float64",
    "n_pairs": "Int64",
    "paired": "boolean",
    "n_for_power": "Int64",
}
POWER_CAP = 10**12  # n_for_power above this (a delta of rounding size) is stored as missing
CONTROL = "random"  # the control every method is compared with, put as b
UNPAIRED = "unpaired (bootstrap of independent units)"


def differences(cells: pd.DataFrame) -> pd.DataFrame:
    """The difference table (columns COLUMNS) of `cells` (bench.report.cells.headline_cells)."""
    out = []
    cells = cells[cells["compared"].astype(bool)]  # tasks whose units settings share
    cells = cells.assign(_rank=cells["task_order"])  # the tasks in their declared order
    for _, block in cells.groupby(BLOCK, dropna=False, sort=False):
        family = []
        keys = ["task", "metric", "encoder", "protocol", "dataset_hash"]
        block = block.sort_values(["_rank", "order"]) if len(block) else block
        for (task, metric, encoder, protocol, dataset), part in block.groupby(
            keys, dropna=False, sort=False
        ):
            if pd.isna(dataset):
                if part["setting_hash"].nunique() > 1:
                    log.warning(
                        "%s: %d settings lack one dataset_hash (older code or mixed "
                        "datasets); not compared",
                        metric,
                        part["setting_hash"].nunique(),
                    )
                continue
            records = sorted(part.to_dict("records"), key=_order)
            for a, b in combinations(records, 2):
                if task == "steering" and _kind(a) != _kind(b):  # one kind per comparison
                    log.warning(
                        "%s: %s (description %s) and %s (description %s) are judged "
                        "against different description kinds; not compared",
                        metric,
                        a["setting"],
                        _kind(a),
                        b["setting"],
                        _kind(b),
                    )
                    continue
                if pd.isna(a["value"]) or pd.isna(b["value"]):
                    continue  # a missing value has no difference
                d = difference(estimate(a), estimate(b))
                family.append(
                    {
                        **{k: a[k] for k in BLOCK},
                        "metric": metric,
                        "encoder": None if pd.isna(encoder) else encoder,
                        "protocol": None if pd.isna(protocol) else protocol,
                        "description": _kind(a),  # b's too: kinds are never mixed
                        "method_a": a["method"],
                        "setting_a": a["setting"],
                        "method_b": b["method"],
                        "setting_b": b["setting"],
                        "delta": d.delta,
                        "ci_low": d.ci_low,
                        "ci_high": d.ci_high,
                        "_p": d.p,
                        "n_pairs": d.n_pairs,
                        "paired_over": a["paired_over"] or b["paired_over"],
                        "paired": d.paired,
                        "n_for_power": _capped(d.n_for_power),
                    }
                )
        for row, p in zip(family, holm([r.pop("_p") for r in family]), strict=True):
            out.append({**row, "p_holm": p})
    frame = pd.DataFrame(out, columns=COLUMNS)
    return frame.astype({**TYPES, **{c: "string" for c in COLUMNS if c not in TYPES}})


HOLM_ALPHA = 0.05  # the family-wise error rate a Holm-adjusted p is compared with


def separates(row: dict) -> bool:
    """True when the difference's 95% interval excludes 0."""
    low, high = row["ci_low"], row["ci_high"]
    return pd.notna(low) and pd.notna(high) and (low > 0 or high < 0)


def differs_from_control(diffs: pd.DataFrame) -> set[tuple]:
    """The `mark_key` of each cell whose difference from every `random` setting it was
    compared with excludes 0."""
    rows = diffs[diffs["method_b"].eq(CONTROL) & diffs["method_a"].ne(CONTROL)]
    marks: dict[tuple, bool] = {}
    for row in rows.to_dict("records"):
        key = mark_key(row, row["setting_a"])
        marks[key] = marks.get(key, True) and separates(row)
    return {key for key, mark in marks.items() if mark}


def differences_section(diffs: pd.DataFrame, cells: pd.DataFrame) -> str:
    """report.md's section: a table per (model, layer, hook)."""
    head = (
        "## Differences between settings\n\n"
        "For every pair of settings in one table (same model, layer, hook and dataset), per "
        "headline metric: `delta` = a − b with its 95% bootstrap interval, from the cells' "
        "bootstrap replicates (seeds averaged). `paired over X`: both were scored on the same "
        "units X, and the replicates are subtracted resample by resample; "
        f"`{UNPAIRED}` otherwise. `p_holm`: the two-sided bootstrap p-value, Holm-adjusted "
        "over the family of every difference in that table (one model, layer and hook: all "
        "its metrics and pairs). `separated`: the interval excludes 0 and Holm's p is below "
        f"{HOLM_ALPHA}; `interval excludes 0; Holm does not`: only the interval does. A pair "
        "whose interval includes 0 says how many units it would take to separate at 80% "
        "power (`n_for_power` in the parquet is filled on every row: the units 80% power "
        "needs at the observed effect). All rows are in "
        "[differences.parquet](differences.parquet)."
    )
    mixed = _mixed_kinds(cells)
    if mixed:
        head += (
            f"\n\n**Steering settings judged against different description kinds "
            f"({mixed}) are not compared.**"
        )
    if diffs.empty:
        return f"{head}\n\nNo two settings share a table, dataset and metric."
    parts = [head]
    for _, block in diffs.groupby(BLOCK, dropna=False, sort=False):
        first = block.iloc[0]
        title = f"### {first['model']} · layer {first['layer']} · `{first['hook']}`"
        family = f"Holm family: {block['p_holm'].notna().sum()} p-values."
        header = ["metric", "a", "b", "delta [95% CI]", "p_holm", "n_pairs", "comparison", "power"]
        parts.append(
            f"{title}\n\n{family}\n\n{md_table(header, [_md_row(r) for r in block.to_dict('records')])}"
        )
    return "\n\n".join(parts)


def _md_row(row: dict) -> list[str]:
    metric = row["metric"] if pd.isna(row["encoder"]) else f"{row['metric']} ({row['encoder']})"
    if pd.notna(row["protocol"]) and row["protocol"] != DEFAULT_PROTOCOL:
        metric += f" ({row['protocol']} protocol)"
        if pd.notna(row.get("description")):  # a feature protocol's kinds can differ by task
            metric += f" ({row['description']} descriptions)"
    delta = num(row["delta"])
    if pd.notna(row["ci_low"]):
        delta += f" [{num(row['ci_low'])}, {num(row['ci_high'])}]"
    how = f"paired over {row['paired_over']}" if row["paired"] else UNPAIRED
    if pd.isna(row["ci_low"]):
        how = "no interval: a cell has no bootstrap replicates"
    power = MISSING
    if pd.notna(row["ci_low"]) and not separates(row) and pd.notna(row["n_for_power"]):
        power = f"{int(row['n_for_power'])} units to separate at 80% power"
    elif separates(row) and pd.notna(row["p_holm"]) and row["p_holm"] >= HOLM_ALPHA:
        power = "interval excludes 0; Holm does not"
    elif separates(row):
        power = "separated"
    p = MISSING if pd.isna(row["p_holm"]) else f"{row['p_holm']:.3g}"
    return [metric, row["setting_a"], row["setting_b"], delta, p, str(row["n_pairs"]), how, power]


def _mixed_kinds(cells: pd.DataFrame) -> str:
    """The description kinds of a steering protocol judged against several kinds in one
    table, else ''."""
    found = []
    for _, block in cells.groupby(BLOCK, dropna=False, sort=False):
        found += mixed_kinds(block)
    return ", ".join(sorted(set(found)))


def _order(cell: dict) -> tuple:
    """a before b: the control last, then by method and setting label."""
    return (cell["method"] == CONTROL, str(cell["method"]), str(cell["setting"]))


def _kind(cell: dict) -> str | None:
    return None if pd.isna(cell["description"]) else str(cell["description"])


def mark_key(row: dict, setting: str) -> tuple[str, ...]:
    """A cell's (model, layer, hook, metric, encoder, protocol, description kind, setting) as
    text, to find its marks: a steering protocol judged against two kinds has a cell, and a
    difference from random, for each."""
    keys = ("metric", "encoder", "protocol")
    values = [*(row[k] for k in (*BLOCK, *keys)), row.get("description"), setting]
    return tuple("" if v is None or pd.isna(v) else str(v) for v in values)


def _capped(n: int | None) -> int | None:
    return n if n is not None and n <= POWER_CAP else None

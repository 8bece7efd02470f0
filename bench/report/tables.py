"""The report's tables: each task's headline summary metrics per method, as markdown for
report.md or fixed-width text for a terminal, and the comparison with the paper's numbers.

All of them start from `headline_cells`, which turns summary rows (no feature, no concept)
into one formatted cell per (setting, task, method, metric).
"""

from __future__ import annotations

import logging

import pandas as pd

from bench.hooks import HOOKS
from bench.report.common import MISSING, md_table, norm, num, plain, settings, supervised_methods

log = logging.getLogger(__name__)

HEADLINES = {  # task -> (title, headline summary metrics); other tasks show every summary metric
    "concept_detection": ("Concept detection", ["mean_feature_auroc", "concept_coverage", "frac_s_cd_positive"]),
    "steering": ("Steering", ["steering_score", "heldout_steering_score", "concept_score", "fluency_score"]),
    "reconstruction": ("Reconstruction", ["fvu", "kl_spliced", "ce_delta"]),
    "synthetic_recovery": ("Synthetic recovery (lowest noise of each generator)", ["mcc", "recovered_fraction"]),
}  # fmt: skip
PAPER_JUDGE = "gpt-4o-mini"
PAPER_SETTING = ("hook", "rank", "sparsity", "init")  # optional reference columns, shown if set
GAP = "  "  # between the columns of the console table


def headline_cells(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, task, method, column): one run gives `value [ci_low, ci_high]`,
    several give `mean (n=k)` over the defined values, none gives —."""
    rows = summary[summary["feature"].isna() & summary["concept"].isna()].copy()
    pairs = zip(rows["task"], rows["metric"], strict=True)
    rows = rows[pd.Series([m in _headlines(t, m) for t, m in pairs], index=rows.index, dtype=bool)]
    rows["setting"] = settings(rows)
    rows["_gen"] = rows["generator"].astype("string") if "generator" in rows else pd.NA
    rows["_noise"] = pd.to_numeric(rows.get("noise", pd.Series(dtype=float)), errors="coerce")
    lowest = rows.groupby(["setting", "task", "_gen"], dropna=False)["_noise"].transform("min")
    rows = rows[rows["_noise"].isna() | rows["_noise"].eq(lowest)]
    out = []
    keys = ["setting", "model", "layer", "hook", "task", "method", "_gen", "metric"]
    for (setting, model, layer, hook, task, method, gen, metric), cell in rows.groupby(
        keys, dropna=False, sort=False
    ):
        values = cell["value"].dropna().astype(float)
        text = f"{num(values.mean())} (n={len(values)})" if len(values) > 1 else MISSING
        if len(values) == 1:  # the run's own 95% interval, when the task gives one
            run = cell[cell["value"].notna()].iloc[0]
            low, high = run.get("ci_low"), run.get("ci_high")
            interval = pd.notna(low) and pd.notna(high)
            text = num(values.iloc[0]) + (f" [{num(low)}, {num(high)}]" if interval else "")
        noise = cell["_noise"].iloc[0]
        label = metric if pd.isna(gen) else f"{metric} ({gen}, noise {noise:g})"
        order = f"{'' if pd.isna(gen) else gen}:{_headlines(task, metric).index(metric):03d}"
        judges = sorted(set(cell["judge"].dropna().astype(str))) if "judge" in cell else []
        out.append({"setting": setting, "model": model, "layer": layer, "hook": hook, "task": task,
                    "method": method, "metric": metric, "label": label, "order": order,
                    "text": text, "value": values.mean() if len(values) else None,
                    "judge": ", ".join(judges)})  # fmt: skip
    columns = ["setting", "model", "layer", "hook", "task", "method", "metric", "label", "order"]
    return pd.DataFrame(out, columns=[*columns, "text", "value", "judge"])


def headline_tables(summary: pd.DataFrame, cells: pd.DataFrame, supervised: set[str]) -> str:
    """report.md's tables: per setting, per task, a row per method (supervised ones marked †)."""
    parts = []
    for setting, group in summary.groupby(settings(summary), sort=False):
        mine = cells[cells["setting"] == setting]
        methods = sorted(group["method"].dropna().unique())
        parts.append(f"## {setting}")
        for task in _tasks(mine):
            part = mine[mine["task"] == task].sort_values("order")
            columns = list(dict.fromkeys(part["label"]))
            header = ["method", *columns] + (["judge"] if task == "steering" else [])
            body = []
            for method in methods:
                ours = part[part["method"] == method]
                texts = ours.set_index("label")["text"]
                row = [
                    f"{method}{' †' * (method in supervised)}",
                    *(texts.get(c, MISSING) for c in columns),
                ]
                judge = ", ".join(ours["judge"].unique()) or MISSING
                body.append(row + ([judge] if task == "steering" else []))
            parts.append(f"### {HEADLINES.get(task, (task,))[0]}\n\n{md_table(header, body)}")
    return "\n\n".join(parts)


def comparison_table(summary: pd.DataFrame) -> str:
    """The headline numbers as fixed-width text for a terminal: per (model, layer, hook), a
    row per method and a column per headline metric of every task (tasks in HEADLINES order).

    A cell is `value [ci_low, ci_high]` for one run with an interval, the plain value without
    one, `mean (n=k)` over several runs and — when missing; supervised methods are marked †.
    """
    if summary.empty:
        return "(no result rows)"
    cells = headline_cells(summary)
    supervised = supervised_methods(summary)
    parts = []
    for setting, group in summary.groupby(settings(summary), sort=False):
        mine = cells[cells["setting"] == setting]
        keys = []  # (task, label) per column, tasks in HEADLINES order
        for task in _tasks(mine):
            part = mine[mine["task"] == task].sort_values("order")
            keys += [(task, label) for label in dict.fromkeys(part["label"])]
        texts = mine.set_index(["task", "label", "method"])["text"].to_dict()
        body = [
            [f"{m}{' †' * (m in supervised)}", *(texts.get((*k, m), MISSING) for k in keys)]
            for m in sorted(group["method"].dropna().astype(str).unique())
        ]
        title = str(setting).replace("`", "")
        parts.append(f"{title}\n{_fixed_width(['method', *(k[1] for k in keys)], body)}")
    legend = "† supervised: fitted with the concept labels, an upper reference"
    return "\n\n".join(parts) + (f"\n{legend}" if supervised else "")


def compare_section(cells: pd.DataFrame, reference: pd.DataFrame) -> str:
    """Our headline numbers beside the paper's for the same (method, metric)."""
    ref = reference.rename(columns={c: f"paper_{c}" for c in reference.columns if c != "metric"})
    ref = ref.assign(
        _method=ref["paper_method"].map(norm), metric=ref["metric"].astype(str).str.strip()
    )
    ours = cells.assign(_method=cells["method"].map(norm))
    merged = ours.merge(ref, on=["_method", "metric"])
    matched = ref.merge(ours[["_method", "metric"]].drop_duplicates(), on=["_method", "metric"])
    head = (
        "## Comparison with the paper\n\nThe paper's values for the same method and metric; "
        "`differs` names what is not the same setting (model, layer, hook and, for steering, "
        f"the judge: the paper's is {PAPER_JUDGE})."
    )
    if merged.empty:
        return f"{head}\n\nNo (method, metric) here is in the reference ({len(ref)} rows)."
    body = []
    for r in merged.to_dict("records"):
        std = r.get("paper_std")
        value = num(r["paper_value"]) + (f" ± {num(std)}" if pd.notna(std) else "")
        setting = [r["paper_model"], f"layer {plain(r['paper_layer'])}"]
        setting += [
            f"{k} {plain(r[f'paper_{k}'])}" for k in PAPER_SETTING if pd.notna(r.get(f"paper_{k}"))
        ]
        body.append([r["setting"], r["method"], r["label"], r["text"], value, ", ".join(setting),
                     str(r["paper_source"]), str(r["paper_confidence"]), _differences(r)])  # fmt: skip
    header = ["ours: setting", "method", "metric", "ours", "paper", "paper: setting", "source"]
    table = md_table([*header, "confidence", "differs"], body)
    return f"{head}\n\n{table}\n\n{len(ref) - len(matched)} reference rows match no result here."


def _differences(row: dict) -> str:
    """What differs between our setting and the paper's for one matched row."""
    notes = []
    model, paper_model = str(row["model"]), str(row["paper_model"])
    if norm(model.rsplit("/", 1)[-1]) != norm(paper_model.rsplit("/", 1)[-1]):
        notes.append(f"model: ours {model}, paper {paper_model}")
    layer, paper_layer = plain(row["layer"]), plain(row["paper_layer"])
    if pd.notna(row["paper_layer"]) and layer != paper_layer:
        notes.append(f"layer: ours {layer}, paper {paper_layer}")
    short = next((k for k, v in HOOKS.items() if v.format(layer=layer) == row["hook"]), row["hook"])
    if pd.notna(row.get("paper_hook")) and str(row["paper_hook"]) not in (short, row["hook"]):
        notes.append(f"hook: ours {short}, paper {row['paper_hook']}")
    if row["task"] == "steering" and row["judge"] != PAPER_JUDGE:
        notes.append(f"judge: ours {row['judge'] or 'unknown'}, paper {PAPER_JUDGE}")
    return "; ".join(notes) or "same setting"


def _headlines(task: str, metric: str) -> list[str]:
    return HEADLINES[task][1] if task in HEADLINES else [metric]


def _tasks(cells: pd.DataFrame) -> list[str]:
    """The tasks present in `cells`: those in HEADLINES in its order, then the rest by name."""
    known = [t for t in HEADLINES if t in set(cells["task"])]
    return known + sorted(set(cells["task"]) - set(known))


def _fixed_width(header: list[str], body: list[list[str]]) -> str:
    """Left-aligned columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *body]
    return "\n".join(
        GAP.join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )

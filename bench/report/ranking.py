"""The ranking: per (model, layer, hook) and steering protocol, the settings ordered by the
steering headline with their 95% intervals, and every pair's paired difference on the
headline metrics that decide the comparison (steering, concept detection through both
encoders, reconstruction). Rendered from the report's cells and difference table (nothing
is recomputed), into `ranking.md` beside report.md; the README's "The ranking" quotes it.
"""

from __future__ import annotations

import pandas as pd

from bench.report.cells import BLOCK, DEFAULT_PROTOCOL
from bench.report.common import MISSING, md_table, num
from bench.report.differences import HOLM_ALPHA, separates

HEADLINE = "heldout_steering_score"
#: (metric, encoder) pairs a ranking's difference table shows beside the steering headline
COMPARED = (
    ("mean_feature_auroc", "native"),
    ("mean_feature_auroc", "projection"),
    ("fvu", None),
    ("explained_variance_per_token", None),
    ("kl_spliced", None),
)


def ranking_section(
    cells: pd.DataFrame, diffs: pd.DataFrame, summary: pd.DataFrame | None = None
) -> str:
    """Markdown: a block per (model, layer, hook) and steering protocol, then (given the
    summary's per-sample rows) what the scores look like as text; '' without steering."""
    steering = cells[(cells["task"] == "steering") & (cells["metric"] == HEADLINE)]
    if steering.empty:
        return ""
    parts = ["# The ranking"]
    for block, part in steering.groupby(BLOCK, sort=False, dropna=False):
        model, layer, hook = block
        protocols = part["protocol"].fillna(DEFAULT_PROTOCOL)
        for protocol in sorted(protocols.unique(), key=lambda p: (p != DEFAULT_PROTOCOL, p)):
            mine = part[protocols == protocol].sort_values("value", ascending=False)
            parts.append(f"## {model} · layer {layer} · `{hook}` · {protocol} protocol")
            parts.append(_ordered(mine, diffs, protocol))
            parts.append(_pairs(mine, diffs, block, protocol))
    if summary is not None and (samples := samples_section(summary)):
        parts.append(samples)
    return "\n\n".join(parts) + "\n"


def samples_section(summary: pd.DataFrame, per_setting: int = 3) -> str:
    """Three held-out samples per setting for one concept under the concept protocol, at
    the (KL target, sign) its steering chose on the other half: the texts behind a
    `heldout_steering_score`. The concept is the first, alphabetically, that every setting
    steered (fixed in advance, not picked by score); the job is each setting's first seed."""
    if not {"protocol", "text", "concept", "sample"} <= set(summary.columns):
        return ""  # no per-sample texts under the concept protocol in these jobs
    rows = summary[(summary["task"] == "steering") & (summary["protocol"] == "concept")]
    chosen = rows[rows["metric"] == HEADLINE].dropna(subset=["kl_target", "concept"])
    if chosen.empty:
        return ""
    per_concept = chosen.groupby("concept")["setting"].nunique()
    everywhere = sorted(per_concept[per_concept == chosen["setting"].nunique()].index)
    if not everywhere:
        return ""
    concept = everywhere[0]
    texts = rows[(rows["metric"] == "steering_score") & rows["text"].notna()]
    parts = [f"## Samples: `{concept}`, concept protocol, held-out half"]
    for setting, part in chosen[chosen["concept"] == concept].groupby("setting", sort=True):
        first = part.sort_values("seed").iloc[0]
        mine = texts[(texts["job_dir"] == first["job_dir"]) & (texts["concept"] == concept)
                     & (texts["kl_target"] == first["kl_target"])
                     & (texts["sign"] == first["sign"]) & (texts["sample"] % 2 == 1)]  # fmt: skip
        header = (f"**{setting}** (seed {int(first['seed'])}, KL {num(first['kl_target'])}, "
                  f"sign {int(first['sign']):+d}; held-out score {num(first['value'])})")  # fmt: skip
        lines = [
            f"- steering {num(r['value'])}: “{_quote(r['text'])}”"
            for r in mine.sort_values("sample").head(per_setting).to_dict("records")
        ]
        parts.append("\n".join([header, "", *(lines or ["- (no generated text)"])]))
    return "\n\n".join(parts)


def _quote(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _rows(diffs: pd.DataFrame, block: tuple, metric: str, encoder, protocol) -> pd.DataFrame:
    rows = diffs
    for key, value in zip(BLOCK, block, strict=True):
        rows = rows[rows[key].astype(str) == str(value)]
    rows = rows[rows["metric"] == metric]
    rows = rows[rows["encoder"].isna()] if encoder is None else rows[rows["encoder"] == encoder]
    if metric == HEADLINE:
        rows = rows[rows["protocol"].fillna(DEFAULT_PROTOCOL) == protocol]
    return rows


def _ordered(mine: pd.DataFrame, diffs: pd.DataFrame, protocol: str) -> str:
    """The settings by the headline, best first, each with its difference from random."""
    block = tuple(mine.iloc[0][k] for k in BLOCK)
    against = _rows(diffs, block, HEADLINE, None, protocol)
    body = []
    for rank, cell in enumerate(mine.to_dict("records"), 1):
        vs = against[(against["setting_a"] == cell["setting"]) & (against["method_b"] == "random")]
        versus = _difference(vs.iloc[0]) if len(vs) else MISSING
        low, high = cell["ci_low"], cell["ci_high"]
        interval = f"{num(cell['value'])} [{num(low)}, {num(high)}]"
        seeds = f"{cell['seeds']} seeds" if cell.get("seeds", 1) > 1 else "1 seed"
        body.append([str(rank), str(cell["setting"]), interval, str(cell["n"]), seeds, versus])
    header = ["rank", "setting", f"{HEADLINE} [95% CI]", "n", "seeds", "− random: Δ [95% CI]"]
    return md_table(header, body)


def _pairs(mine: pd.DataFrame, diffs: pd.DataFrame, block: tuple, protocol: str) -> str:
    """Every pair of settings: its difference on the steering headline and on COMPARED."""
    metrics = [(HEADLINE, None), *COMPARED]
    tables = {m: _rows(diffs, block, *m, protocol) for m in metrics}
    settings = list(mine["setting"])
    body = []
    for i, a in enumerate(settings):
        for b in settings[i + 1 :]:
            row = [f"{a} − {b}"]
            for metric in metrics:
                found = _pair(tables[metric], a, b)
                row.append(_difference(found) if found is not None else MISSING)
            body.append(row)
    header = ["pair"] + [m if e is None else f"{m} ({e})" for m, e in metrics]
    note = (
        "Each cell: Δ = a − b [95% CI], Holm p, and where the interval includes 0 the units "
        "80% power would need (n80). A missing cell: that metric has no rows for the pair "
        "(no decoder: no reconstruction)."
    )
    return note + "\n\n" + md_table(header, body)


def _pair(rows: pd.DataFrame, a: str, b: str) -> dict | None:
    """The difference a − b (negated when the table holds b − a)."""
    found = rows[(rows["setting_a"] == a) & (rows["setting_b"] == b)]
    if len(found):
        return found.iloc[0].to_dict()
    found = rows[(rows["setting_a"] == b) & (rows["setting_b"] == a)]
    if not len(found):
        return None
    row = found.iloc[0].to_dict()
    low, high = row["ci_low"], row["ci_high"]
    return {**row, "delta": -row["delta"], "ci_low": -high, "ci_high": -low}


def _difference(row) -> str:
    text = f"{num(row['delta'])} [{num(row['ci_low'])}, {num(row['ci_high'])}]"
    if pd.notna(row.get("p_holm")):
        text += f" p={row['p_holm']:.2g}"
    if not separates(row) and pd.notna(row.get("n_for_power")):
        text += f" n80={int(row['n_for_power'])}"
    elif separates(row) and pd.notna(row.get("p_holm")) and row["p_holm"] < HOLM_ALPHA:
        text = f"**{text}**"
    return text

"""`--compare paper`: our numbers beside the SNMF paper's (results/paper_reference.csv,
installed as the package data `bench.reference/paper_reference.csv`).

A paper value is put beside ours only when every setting the paper fixes matches: model,
layer, hook, rank, sparsity, init and, for steering, the judge (ours read from the job's
`meta["setting"]`). Otherwise the row names the settings that differ and shows no number of
ours. The paper's per-feature numbers (`s_cd`: a mean over features) are compared with the
mean of our per-feature rows, never with a summary row.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bench.core.hooks import short_of
from bench.report.common import MISSING, ReportError, md_table, norm, num, one_line, plain
from bench.report.series import PER_FEATURE

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

REFERENCE_COLUMNS = ["model", "layer", "method", "metric", "value", "source", "confidence"]
PAPER_JUDGE = "gpt-4o-mini"  # the paper's judge (steering)
RANK_KEYS = ("method.rank", "method.d_sae", "method.n_features")  # a method's capacity k
FIXED = {"sparsity": "method.sparsity", "init": "method.init"}  # reference column -> our key


def packaged_reference() -> Traversable | Path:
    """The installed paper_reference.csv; the checkout's results/ copy when featbench runs
    from a source tree that was never installed."""
    try:
        return resources.files("bench.reference").joinpath("paper_reference.csv")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "results" / "paper_reference.csv"


def read_reference(compare: str, packaged: Traversable | Path) -> pd.DataFrame:
    """The paper's numbers: `paper` is `packaged`, anything else a CSV path."""
    path = packaged if compare == "paper" else Path(compare)
    if not path.is_file():
        columns = ", ".join(REFERENCE_COLUMNS)
        raise ReportError(f"--compare {compare}: {path} does not exist (a CSV of {columns})")
    try:
        with path.open("rb") as handle:
            reference = pd.read_csv(handle)
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: unreadable CSV ({one_line(err)})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in reference]
    if missing:
        raise ReportError(f"{path}: lacks columns {missing}; expected {REFERENCE_COLUMNS}")
    return reference


def compare_section(
    cells: pd.DataFrame,
    feature_means: pd.DataFrame,
    settings: dict[str, dict | None],
    reference: pd.DataFrame,
) -> str:
    """report.md's comparison: per reference row, each of our settings with that method and
    metric (summary cells, or bench.report.series.feature_means for PER_FEATURE metrics)."""
    head = (
        "## Comparison with the paper\n\nA paper value stands beside ours only when every "
        "setting the paper fixes matches (model, layer, hook, rank, sparsity, init and, for "
        f"steering, the judge: the paper's is {PAPER_JUDGE}); otherwise `differs` names them "
        "and ours is not shown. The paper's per-feature numbers (S_CD) are compared with the "
        "mean of our per-feature rows."
    )
    ours = pd.concat(
        [cells.assign(_unit="summary"), feature_means.assign(_unit="feature")], ignore_index=True
    )
    ours["_method"] = ours["method"].map(norm)
    body, unmatched = [], 0
    for ref in reference.to_dict("records"):
        metric = str(ref["metric"]).strip()
        unit = "feature" if metric in PER_FEATURE else "summary"
        mine = ours[(ours["_method"] == norm(ref["method"])) & (ours["metric"] == metric)]
        mine = mine[mine["_unit"] == unit]
        unmatched += mine.empty
        for cell in mine.to_dict("records"):
            differs = mismatches(ref, cell, settings.get(cell["setting_hash"]))
            text = MISSING if differs else cell["text"]
            body.append(
                [
                    f"{cell['place']} · {cell['setting']}",
                    cell["label"],
                    text,
                    _paper_value(ref),
                    _paper_setting(ref),
                    str(ref["source"]),
                    str(ref["confidence"]),
                    "; ".join(differs) or "same setting",
                ]
            )
    if not body:
        return f"{head}\n\nNo (method, metric) here is in the reference ({len(reference)} rows)."
    header = ["ours: setting", "metric", "ours", "paper", "paper: setting", "source"]
    table = md_table([*header, "confidence", "differs"], body)
    return f"{head}\n\n{table}\n\n{unmatched} reference rows match no result here."


def mismatches(ref: dict, cell: dict, setting: dict | None) -> list[str]:
    """The settings the paper fixes in `ref` that `cell` (with its job's setting) does not
    share, as `name: ours X, paper Y`."""
    setting = setting or {}
    out = []
    model, paper_model = str(cell["model"]), str(ref["model"])
    if norm(model.rsplit("/", 1)[-1]) != norm(paper_model.rsplit("/", 1)[-1]):
        out.append(f"model: ours {model}, paper {paper_model}")
    if pd.notna(ref.get("layer")) and plain(cell["layer"]) != plain(float(ref["layer"])):
        out.append(f"layer: ours {plain(cell['layer'])}, paper {plain(ref['layer'])}")
    short = setting.get("hook") or short_of(str(cell["hook"])) or cell["hook"]
    if pd.notna(ref.get("hook")) and str(ref["hook"]) not in (short, cell["hook"]):
        out.append(f"hook: ours {short}, paper {ref['hook']}")
    if pd.notna(ref.get("rank")):
        rank = next((setting[k] for k in RANK_KEYS if setting.get(k) is not None), None)
        if not _same(rank, ref["rank"]):
            out.append(f"rank: ours {_ours(rank)}, paper {plain(ref['rank'])}")
    for column, key in FIXED.items():
        if pd.notna(ref.get(column)) and not _same(setting.get(key), ref[column]):
            out.append(f"{column}: ours {_ours(setting.get(key))}, paper {plain(ref[column])}")
    if cell["task"] == "steering":
        judge = setting.get("judge.model") or cell.get("judge") or None
        if judge != PAPER_JUDGE:
            out.append(f"judge: ours {judge or 'unknown'}, paper {PAPER_JUDGE}")
    return out


def _paper_value(ref: dict) -> str:
    value = num(ref["value"])
    if pd.notna(ref.get("std")):
        value += f" ± {num(ref['std'])}"
    bound = ref.get("bound")
    return {"lower": "≥ ", "upper": "≤ "}.get(bound, "") + value if pd.notna(bound) else value


def _paper_setting(ref: dict) -> str:
    parts = [str(ref["model"]), f"layer {plain(ref['layer'])}"]
    parts += [
        f"{k} {plain(ref[k])}" for k in ("hook", "rank", "sparsity", "init") if pd.notna(ref.get(k))
    ]
    return ", ".join(parts)


def _same(ours: Any, paper: Any) -> bool:
    if ours is None:
        return False
    try:
        return float(ours) == float(paper)
    except (TypeError, ValueError):
        return str(ours) == str(paper)


def _ours(value: Any) -> str:
    return "unknown" if value is None else plain(value)

"""The numbers the plots and the paper comparison show beyond the cells: computed here,
once, by `build` (or, for one job's plots, by `plot_job`), so no renderer computes.

- `plot_series`: per plot series (a setting, a method for one job), the mean steering
  score at each KL target with its 95% interval over units, every feature's test AUROC,
  and the steering headline with its interval;
- `feature_means`: per setting (and encoder), the mean of the per-feature rows of the
  metrics the paper reports as a mean over features (S_CD), per job then over seeds.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import pandas as pd

from bench import stats
from bench.report.cells import DEFAULT_PROTOCOL
from bench.report.common import num, place, series_labels, supervised_methods

PER_FEATURE = {"s_cd"}  # metrics the paper gives as a mean over features
HEADLINE = "heldout_steering_score"  # the steering task's headline (its declaration's first)
FEATURE_MEAN_COLUMNS = [
    "place",
    "model",
    "layer",
    "hook",
    "setting_hash",
    "setting",
    "method",
    "task",
    "metric",
    "encoder",
    "value",
    "label",
    "text",
    "judge",
]


class PlotSeries(NamedTuple):
    """What the sweep's plots draw; an empty frame means that plot has no data."""

    # label, kl_target, value, ci_low, ci_high, n: the mean over units (a concept, or a
    # feature, of one job) of each unit's mean steering score at that KL target, signs and
    # samples pooled inside the unit, with its 95% bootstrap interval over units
    steering_vs_kl: pd.DataFrame
    auroc: pd.DataFrame  # label, value (one row per feature of a concept-detection job)
    # label, protocol, value, ci_low, ci_high, n: each setting's steering headline
    # (heldout_steering_score) with its 95% interval, seeds averaged as the report's cells
    headline: pd.DataFrame


KL_COLUMNS = ["label", "kl_target", "value", "ci_low", "ci_high", "n"]
HEADLINE_COLUMNS = ["label", "protocol", "value", "ci_low", "ci_high", "n"]


def plot_series(summary: pd.DataFrame, cells: pd.DataFrame | None = None) -> PlotSeries:
    """The plots' data: series labelled by setting (and by place when there are several,
    and by steering protocol when there are several). `cells` (the report's): the headline
    with its seeds averaged; without them (one job's plots), the job's own summary rows."""
    labels = partial(
        series_labels,
        several=place(summary).nunique() > 1,
        supervised=supervised_methods(summary),
    )
    steer = summary[(summary["task"] == "steering") & (summary["metric"] == "steering_score")]
    steer = steer[steer["feature"].notna() & steer["value"].notna() & steer["kl_target"].notna()]
    steer = steer[steer["sample"].notna()] if "sample" in steer else steer.iloc[:0]
    steer = steer.assign(label=_with_protocol(steer, labels(steer)))
    detect = summary[(summary["task"] == "concept_detection") & (summary["metric"] == "auroc")]
    detect = detect[detect["feature"].notna() & detect["value"].notna()]
    auroc = pd.DataFrame({"label": labels(detect), "value": detect["value"].astype(float)})
    return PlotSeries(
        _steering_by_kl(steer),
        auroc.sort_values("label", kind="stable").reset_index(drop=True),
        _headline(summary, cells, labels),
    )


def _with_protocol(rows: pd.DataFrame, labels: pd.Series) -> pd.Series:
    """Labels with the steering protocol appended when the rows hold more than one."""
    if "protocol" not in rows or rows["protocol"].nunique() < 2:
        return labels
    return labels + " (" + rows["protocol"].fillna(DEFAULT_PROTOCOL).astype(str) + ")"


def _steering_by_kl(steer: pd.DataFrame) -> pd.DataFrame:
    """Per (label, KL target): the mean over units of their mean score, with an interval."""
    if steer.empty:
        return pd.DataFrame(columns=KL_COLUMNS)
    # a unit is a concept under the concept protocol, a feature otherwise (older rows carry
    # neither the protocol nor the concept column: their units are features)
    feature = steer["feature"].astype(str)
    if "protocol" in steer and "concept" in steer:
        unit = steer["concept"].where(steer["protocol"].eq("concept"), feature).astype(str)
    else:
        unit = feature
    job = steer["job_dir"].astype(str) if "job_dir" in steer else "job"
    per_unit = (
        steer.assign(unit=job + "/" + unit, value=steer["value"].astype(float))
        .groupby(["label", "kl_target", "unit"], sort=True)["value"]
        .mean()
        .reset_index()
    )
    out = []
    for (label, kl), part in per_unit.groupby(["label", "kl_target"], sort=True):
        est = stats.mean_estimate(part["value"].to_numpy(), paired_over="unit")
        out.append([label, float(kl), est.value, est.ci_low, est.ci_high, est.n])
    return pd.DataFrame(out, columns=KL_COLUMNS)


def _headline(summary: pd.DataFrame, cells: pd.DataFrame | None, labels) -> pd.DataFrame:
    """The steering headline per setting (and protocol), with its interval."""
    if cells is not None:
        rows = cells[(cells["task"] == "steering") & (cells["metric"] == HEADLINE)]
        rows = rows.assign(label=rows["setting"].astype(str))
    else:
        rows = summary[(summary["task"] == "steering") & (summary["metric"] == HEADLINE)]
        rows = rows[rows["feature"].isna() & _column(rows, "concept").isna()]
        rows = rows.assign(label=labels(rows))
    if rows.empty:
        return pd.DataFrame(columns=HEADLINE_COLUMNS)
    return pd.DataFrame(
        {
            "label": rows["label"].astype(str),
            "protocol": _column(rows, "protocol").fillna(DEFAULT_PROTOCOL).astype(str),
            "value": rows["value"].astype(float),
            "ci_low": _column(rows, "ci_low").astype(float),
            "ci_high": _column(rows, "ci_high").astype(float),
            "n": _column(rows, "n"),
        }
    ).reset_index(drop=True)


def _column(rows: pd.DataFrame, name: str) -> pd.Series:
    """A column of `rows`, or missing values where rows of older or partial tables lack it."""
    return rows[name] if name in rows else pd.Series(pd.NA, index=rows.index, dtype=object)


def feature_means(summary: pd.DataFrame) -> pd.DataFrame:
    """Per setting (and encoder), the mean of our per-feature rows of each PER_FEATURE metric:
    per job, then over seeds; `m ± sd (n=k features)` with sd over all features pooled."""
    rows = summary[summary["metric"].isin(PER_FEATURE) & summary["feature"].notna()]
    rows = rows[rows["value"].notna()]
    encoder = rows["encoder"] if "encoder" in rows else pd.Series(pd.NA, index=rows.index)
    out = []
    keys = [rows["setting_hash"], rows["metric"], encoder]
    for (_, metric, enc), part in rows.groupby(keys, dropna=False, sort=False):
        values = part["value"].astype(float)
        per_job = values.groupby(part["job_dir"]).mean()
        seeds = len(per_job)
        text = (
            f"{num(per_job.mean())} ± {num(values.std(ddof=1))} (n={len(values) // seeds} features"
        )
        first = part.iloc[0]
        out.append(
            {
                "place": place(part.iloc[:1]).iloc[0],
                "model": first["model"],
                "layer": first["layer"],
                "hook": first["hook"],
                "setting_hash": first["setting_hash"],
                "setting": first["setting"],
                "method": first["method"],
                "task": first["task"],
                "metric": metric,
                "encoder": enc,
                "value": per_job.mean(),
                "label": f"{metric} (mean over features{'' if pd.isna(enc) else f', {enc}'})",
                "text": text + (f", {seeds} seeds)" if seeds > 1 else ")"),
                "judge": "",
            }
        )
    return pd.DataFrame(out, columns=FEATURE_MEAN_COLUMNS)

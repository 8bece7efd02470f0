"""The numbers the plots and the paper comparison show beyond the cells: computed here,
once, by `build` (or, for one job's plots, by `plot_job`), so no renderer computes.

- `plot_series`: per plot series (a setting, a method for one job), the mean steering
  score at each KL target, and every feature's test AUROC;
- `feature_means`: per setting (and encoder), the mean of the per-feature rows of the
  metrics the paper reports as a mean over features (S_CD), per job then over seeds.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import pandas as pd

from bench.report.common import num, place, series_labels, supervised_methods

PER_FEATURE = {"s_cd"}  # metrics the paper gives as a mean over features
FEATURE_MEAN_COLUMNS = ["place", "model", "layer", "hook", "setting_hash", "setting", "method",
                        "task", "metric", "encoder", "value", "label", "text", "judge"]  # fmt: skip


class PlotSeries(NamedTuple):
    """What the sweep's plots draw; an empty frame means that plot has no data."""

    steering_vs_kl: pd.DataFrame  # label, kl_target, value (mean over features, signs, samples)
    auroc: pd.DataFrame  # label, value (one row per feature of a concept-detection job)


def plot_series(summary: pd.DataFrame) -> PlotSeries:
    """The plots' data: series labelled by setting (and by place when there are several)."""
    labels = partial(
        series_labels,
        several=place(summary).nunique() > 1,
        supervised=supervised_methods(summary),
    )
    steer = summary[(summary["task"] == "steering") & (summary["metric"] == "steering_score")]
    steer = steer[steer["feature"].notna() & steer["value"].notna() & steer["kl_target"].notna()]
    steer = steer[steer["sample"].notna()] if "sample" in steer else steer.iloc[:0]
    curves = (
        steer.assign(label=labels(steer), value=steer["value"].astype(float))
        .groupby(["label", "kl_target"], sort=True)["value"]
        .mean()  # features, signs and samples pooled
        .reset_index()
        if not steer.empty
        else pd.DataFrame(columns=["label", "kl_target", "value"])
    )
    detect = summary[(summary["task"] == "concept_detection") & (summary["metric"] == "auroc")]
    detect = detect[detect["feature"].notna() & detect["value"].notna()]
    auroc = pd.DataFrame({"label": labels(detect), "value": detect["value"].astype(float)})
    return PlotSeries(curves, auroc.sort_values("label", kind="stable").reset_index(drop=True))


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
        out.append({
            "place": place(part.iloc[:1]).iloc[0], "model": first["model"], "layer": first["layer"],
            "hook": first["hook"], "setting_hash": first["setting_hash"],
            "setting": first["setting"], "method": first["method"], "task": first["task"],
            "metric": metric, "encoder": enc, "value": per_job.mean(),
            "label": f"{metric} (mean over features{'' if pd.isna(enc) else f', {enc}'})",
            "text": text + (f", {seeds} seeds)" if seeds > 1 else ")"), "judge": "",
        })  # fmt: skip
    return pd.DataFrame(out, columns=FEATURE_MEAN_COLUMNS)

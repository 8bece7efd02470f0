"""Steering scores from plain rows: per unit (a feature, or a concept under the
concept-paired protocol) the held-out and best-over-KL scores, then the summary rows
with 95% bootstrap intervals over units (`bench.stats`).

`tasks/steering.py` produces the rows (one per judged sample, plus sample-less rows
that say why a unit was not steered); everything here is a function of those rows,
so it is tested on hand-made ones (tests/test_steering_units.py).
"""

from __future__ import annotations

import numpy as np

from bench.stats import RESAMPLES, mean_estimate

HELDOUT, BEST_KL = "heldout_steering_score", "best_kl_steering_score"
#: values of the `failure` column: why a row holds no judged score, or a forced 0.
#: EXCLUDED: a sign whose description the writer marked TRASH (no connection), not scored;
#: NO_DIRECTION: nothing to steer (the generated DiffMean's writer gave no sentences)
ZERO_NORM, UNREACHABLE, EMPTY, UNDESCRIBED, EXCLUDED, NO_DIRECTION = (
    "zero_norm",
    "unreachable",
    "empty_generation",
    "no_description",
    "excluded_description",
    "no_direction",
)


def _row(f, concept, metric, value, kl_target, sign, **extra) -> dict:
    return {
        "feature": f,
        "concept": concept,
        "metric": metric,
        "value": value,
        "kl_target": kl_target,
        "sign": sign,
        **extra,
    }


def aggregate(
    rows: list[dict],
    chosen: list,
    *,
    passes: dict | None = None,
    judge_stats: dict[str, float] | None = None,
    seed: int = 0,
    n_resamples: int = RESAMPLES,
    unit: str = "feature",
    units_hash: str | None = None,
    settings: str | None = None,
) -> list[dict]:
    """Per-unit `heldout_steering_score` and `best_kl_steering_score`, then the
    summary rows, from the task's sample rows and failure rows (see `_failure`).
    A unit is the value of each row's `unit` column (`feature`, or `concept` under
    the concept-paired protocol); `chosen` lists them, and `units_hash` names them
    for pairing (None: not shared between methods, as sampled features are).

    Held-out: the (KL target, sign) with the best mean on even samples, reported
    as its mean on odd samples. Best-KL: the best mean on all samples (the
    paper's, optimistic). Ties go to the smaller KL target, then the + sign. A
    failed feature scores 0 in both with its reason; a feature whose judgements
    are all missing is missing. `concept_score` and `fluency_score` summarize
    the held-out samples: each feature's reported half at its chosen target.
    """
    by_unit: dict = {u: [] for u in chosen}
    for r in rows:
        if r.get(unit) in by_unit:
            by_unit[r[unit]].append(r)
    out, heldout_parts, failed = [], {}, {}
    for u in chosen:
        mine = by_unit[u]
        f = u if unit == "feature" else next((r.get("feature") for r in mine), None)
        samples = [r for r in mine if r.get("sample") is not None]
        scores: dict[tuple, dict[int, float | None]] = {}
        for r in samples:
            if r["metric"] == "steering_score":
                scores.setdefault((r["kl_target"], r["sign"]), {})[r["sample"]] = r["value"]
        value, reason = _failed(mine, samples)
        concept = u if unit == "concept" else next((r.get("concept") for r in mine), None)
        for metric, pick, report in ((HELDOUT, _even, _odd), (BEST_KL, _any, _any)):
            if not scores:  # nothing generated: a failure (0) or a missing description
                out.append(_row(f, concept, metric, value, None, None, reason=reason, n=0))
                continue
            v, key, n, why = _select(scores, pick, report)
            out.append(
                _row(f, concept, metric, v, *(key or (None, None)), reason=reason or why, n=n)
            )
            if metric == HELDOUT and key is not None:
                heldout_parts[u] = [
                    r for r in samples if (r["kl_target"], r["sign"]) == key and _odd(r["sample"])
                ]
        if value == 0.0:
            failed[u] = reason
    summary = _summary(
        out,
        rows,
        chosen,
        heldout_parts,
        failed,
        passes or {},
        judge_stats or {},
        seed,
        n_resamples,
        unit,
        units_hash,
    )
    for row in summary:
        if row["metric"] == "steered_features":
            row["settings"] = settings  # the protocol's resolved settings (JSON)
    return out + summary


def _even(s: int) -> bool:
    return s % 2 == 0


def _odd(s: int) -> bool:
    return s % 2 == 1


def _any(s: int) -> bool:
    return True


def _failed(mine: list[dict], samples: list[dict]) -> tuple[float | None, str | None]:
    """(0.0, reason) for a feature that failed to steer, (None, reason) for one that
    could not be judged at all, (None, None) otherwise."""
    kinds = {r.get("failure") for r in mine if r.get("sample") is None}
    reasons = [r["reason"] for r in mine if r.get("sample") is None and r.get("reason")]
    if samples:
        if all(r.get("failure") == EMPTY for r in samples):
            return 0.0, "every generation empty"
        return None, None
    if ZERO_NORM in kinds:
        return 0.0, reasons[0] if reasons else "zero-norm direction"
    if UNREACHABLE in kinds:
        first = next((r["reason"] for r in mine if r.get("failure") == UNREACHABLE), None)
        return 0.0, "every KL target unreachable" + (f" ({first})" if first else "")
    if UNDESCRIBED in kinds or EXCLUDED in kinds or NO_DIRECTION in kinds:
        return None, "; ".join(dict.fromkeys(reasons)) if reasons else "no description"
    return None, "no steering rows for this feature"


def _select(scores: dict, pick, report) -> tuple[float | None, tuple | None, int, str | None]:
    """The best (target, sign) by mean over the samples `pick` accepts; its mean over
    the samples `report` accepts, and how many defined samples that mean has."""

    def defined(values: dict, keep) -> list[float]:
        return [v for s, v in values.items() if keep(s) and v is not None]

    ranked = [(float(np.mean(d)), key) for key, v in scores.items() if (d := defined(v, pick))]
    if not ranked:
        return None, None, 0, "no (KL target, sign) with a defined score in the choosing half"
    _, key = max(ranked, key=lambda p: (p[0], -p[1][0], p[1][1]))
    reported = defined(scores[key], report)
    if not reported:
        return None, key, 0, "no defined score in the reported half"
    return float(np.mean(reported)), key, len(reported), None


def _summary(
    per_feature,
    rows,
    chosen,
    heldout_parts,
    failed,
    passes,
    judge_stats,
    seed,
    n_resamples,
    unit="feature",
    units_hash=None,
) -> list[dict]:
    def estimate(metric: str, values: list, **extra) -> dict:
        est = mean_estimate(
            values, paired_over=unit, units_hash=units_hash, n_resamples=n_resamples, seed=seed
        )
        missing = sum(v is None for v in values)
        return {"metric": metric, **est.row(), "missing": missing, **extra}

    out = [
        estimate(m, [r["value"] for r in per_feature if r["metric"] == m])
        for m in (HELDOUT, BEST_KL)
    ]
    for metric in ("concept_score", "fluency_score"):
        values = []
        for u in chosen:
            got = [r["value"] for r in heldout_parts.get(u, []) if r["metric"] == metric]
            got = [v for v in got if v is not None]
            values.append(float(np.mean(got)) if got else None)
        out.append(estimate(metric, values))
    judged = [
        r
        for r in rows
        if r.get("sample") is not None
        and r.get("failure") != EMPTY
        and r["metric"] in ("concept_score", "fluency_score")
    ]
    sampleless = [
        r for r in rows if r.get("sample") is None and r.get("metric") == "steering_score"
    ]
    targets = {(r[unit], r["kl_target"], r["sign"]) for r in rows if r.get("sample") is not None}
    unreachable = sum(r.get("failure") == UNREACHABLE for r in sampleless)
    searched = [p for f, p in passes.items() if p]
    excluded = [r for r in sampleless if r.get("failure") == EXCLUDED]
    out += [
        {
            "metric": "judge_failures",
            "value": float(sum(r["value"] is None or bool(r.get("judge_failed")) for r in judged)),
            "n": len(judged),
            "features_undescribed": sum(r.get("failure") == UNDESCRIBED for r in sampleless),
            "reason": "failed judgements scored 0 (judge_failure=zero)"
            if any(r.get("judge_failed") and r["value"] is not None for r in judged)
            else None,
        },
        {
            "metric": "excluded_descriptions",
            "value": float(len(excluded)),
            "n": len({r.get(unit) for r in sampleless if r.get("failure") == EXCLUDED}),
            "reason": _counted(r.get("reason") for r in excluded),
        },
        {
            "metric": "no_direction",
            "value": float(sum(r.get("failure") == NO_DIRECTION for r in sampleless)),
            "reason": _counted(
                r.get("reason") for r in sampleless if r.get("failure") == NO_DIRECTION
            ),
        },
        {
            "metric": "failed_features",
            "value": float(len(failed)),
            "n": len(chosen),
            "features": ",".join(map(str, failed)),
            "reason": "; ".join(f"{unit} {u}: {why}" for u, why in failed.items()) or None,
        },
        {
            "metric": "unreachable_targets",
            "value": float(unreachable),
            "n": unreachable + len(targets),
        },
        {
            "metric": "alpha_search_passes",
            "value": float(np.mean(searched)) if searched else None,
            "n": len(searched),
            "reason": None if searched else "no feature searched",
        },
        {
            "metric": "steered_features",
            "value": float(len(chosen)),
            "n": len(chosen),
            "features_chosen": ",".join(map(str, chosen)),
            "unit": unit,
        },
    ]
    return out + [{"metric": f"judge_{k}", "value": float(v)} for k, v in judge_stats.items()]


def _counted(reasons) -> str | None:
    """'reason A (2); reason B (1)': distinct reasons with their counts, cut at 60 characters."""
    counts: dict[str, int] = {}
    for reason in reasons:
        key = (reason or "no reason")[:60]
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{k} ({n})" for k, n in counts.items()) or None

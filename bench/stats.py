"""Statistics for featbench: bootstrap intervals, differences between methods, Holm's correction.

This is the only statistics module; tasks and the report both use it.

- An :class:`Estimate` is a statistic over *units* (test sentences, concepts, features) with a
  95% percentile-bootstrap interval and its bootstrap replicates.
- Resamples are a pure function of ``(n_units, n_resamples, seed)`` (:func:`resample_indices`), so
  two methods scored on the same units with the same seed are resampled identically: their
  replicates are *paired*, and :func:`difference` subtracts them replicate by replicate.
- :func:`holm` adjusts a family of p-values; :func:`n_for_power` says how many units a difference
  of a given size needs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import norm

from bench.core.storage import sha256_json

log = logging.getLogger(__name__)

RESAMPLES = 1000  # default bootstrap resamples: percentile endpoints stable to ~0.05 se
LEVEL = 0.95  # default interval level


def resample_indices(n_units: int, n_resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(B, n) int64 indices, each row a with-replacement resample of ``range(n_units)``.

    A pure function of (n_units, n_resamples, seed), so two methods scored on the same units with
    the same seed get the same resamples (paired).
    """
    if n_units == 0:
        return np.empty((n_resamples, 0), dtype=np.int64)
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_units, size=(n_resamples, n_units), dtype=np.int64)


def units_hash(*parts: object) -> str:
    """An id for a list of units (e.g. the dataset hash and the test sentence ids): two
    estimates with the same id were computed over the same units in the same order."""
    return sha256_json(list(parts))[:16]


@dataclass(frozen=True)
class Estimate:
    """A statistic over units with its 95% percentile-bootstrap interval."""

    value: float | None  # the statistic on all units (None = missing, see reason)
    ci_low: float | None  # 95% percentile-bootstrap interval
    ci_high: float | None
    n: int  # units with a defined value that the statistic is computed over
    paired_over: str | None  # what a unit is: "test sentence" | "concept" | "feature" | ...
    units_hash: str | None  # same hash <=> same units in the same order (pairable)
    replicates: np.ndarray | None = field(compare=False, repr=False)  # (B,) bootstrap replicates
    reason: str | None = None  # why value is None (or how many replicates were undefined)

    @classmethod
    def missing(cls, reason: str, *, paired_over: str | None = None, n: int = 0) -> Estimate:
        """A missing value with its reason, e.g. a summary of per-feature values all undefined."""
        return cls(None, None, None, n, paired_over, None, None, reason)

    def row(self) -> dict:
        """{"value", "ci_low", "ci_high", "n", "paired_over", "units_hash", "reason",
        "replicates"} for a task's summary row (replicates: the numpy array or None)."""
        return {
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "paired_over": self.paired_over,
            "units_hash": self.units_hash,
            "reason": self.reason,
            "replicates": self.replicates,
        }


def percentile_interval(
    replicates: np.ndarray | None, level: float = LEVEL
) -> tuple[float | None, float | None]:
    """The percentile-bootstrap interval: the (1-level)/2 and (1+level)/2 quantiles of the
    replicates, NaN replicates ignored. (None, None) when no replicate is defined.

    The percentile interval is used throughout because it needs no variance formula, so the same
    code covers means, AUROCs and differences, and it respects a statistic's range.
    """
    if replicates is None:
        return None, None
    reps = np.asarray(replicates, dtype=float)
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return None, None
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [tail, 1.0 - tail])
    return float(low), float(high)


def _as_float_array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def mean_estimate(
    values, *, paired_over, units_hash=None, n_resamples=RESAMPLES, seed=0
) -> Estimate:
    """The mean of per-unit values and its percentile-bootstrap interval over units.

    None/NaN values are dropped before resampling and counted out of n. Dropping changes which
    units are resampled, so a ``units_hash`` given with missing values is discarded (logged):
    the estimate could otherwise be paired with one over different units.
    """
    arr = _as_float_array(values)
    kept = arr[~np.isnan(arr)]
    if kept.size < arr.size and units_hash is not None:
        log.warning("%d of %d values missing: units_hash dropped", arr.size - kept.size, arr.size)
        units_hash = None
    if kept.size == 0:
        return Estimate.missing("no defined value", paired_over=paired_over)
    replicates = kept[resample_indices(kept.size, n_resamples, seed)].mean(1)
    low, high = percentile_interval(replicates)
    value, n = float(kept.mean()), int(kept.size)
    return Estimate(value, low, high, n, paired_over, units_hash, replicates)


def statistic_estimate(
    n_units: int,
    statistic: Callable[[np.ndarray], float],
    *,
    paired_over,
    units_hash=None,
    n_resamples=RESAMPLES,
    seed=0,
) -> Estimate:
    """Any statistic of the units (e.g. an AUROC over test sentences) with its bootstrap interval.

    ``statistic(indices) -> float`` computes the statistic on the units at ``indices``; the value
    is ``statistic(arange(n))`` and each replicate is the statistic on one resample. A replicate
    may be NaN (e.g. a resample without positives): it stays in ``replicates`` so that paired
    replicates keep their alignment, the interval ignores it and ``reason`` says how many.
    """
    if n_units == 0:
        return Estimate.missing("no units", paired_over=paired_over)
    value = float(statistic(np.arange(n_units)))
    if math.isnan(value):
        return Estimate.missing("statistic undefined", paired_over=paired_over, n=n_units)
    idx = resample_indices(n_units, n_resamples, seed)
    replicates = np.array([statistic(row) for row in idx], dtype=float)
    low, high = percentile_interval(replicates)
    undefined = int(np.isnan(replicates).sum())
    reason = f"{undefined} of {n_resamples} replicates undefined, dropped" if undefined else None
    return Estimate(value, low, high, n_units, paired_over, units_hash, replicates, reason)


@dataclass(frozen=True)
class Difference:
    """a - b between two estimates, with its bootstrap interval and p-value."""

    delta: float | None  # a.value - b.value
    ci_low: float | None  # 95% percentile interval of the difference's replicates
    ci_high: float | None
    p: float | None  # two-sided bootstrap p-value for delta == 0 (None when not bootstrapped)
    n_pairs: int  # paired: units in both; unpaired: the smaller of the two n
    paired: bool  # True when the replicates were subtracted resample by resample
    sd_unit: float | None  # per-unit sd of the difference implied by the bootstrap (se * sqrt(n))
    n_for_power: int | None  # units to separate at 80% power, two-sided 5% (None: delta 0/None)

    def row(self) -> dict:
        """The fields as a dict, for a row of the difference table."""
        return asdict(self)


def _bootstrap_p(delta: float, d: np.ndarray) -> float:
    """Two-sided p-value of delta = 0 from the bootstrap standard error of the difference
    (normal approximation: 2 * (1 - Phi(|delta| / se))).

    Counting replicates beyond 0 cannot go below 2 / (B + 1): with B = 1000 and Holm over
    a report's 60-odd differences, no adjusted p could reach 0.05 however clear the
    difference. The standard error has no such floor."""
    se = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if se == 0.0:
        return 1.0 if delta == 0 else 0.0
    return float(min(1.0, 2.0 * norm.sf(abs(delta) / se)))


def difference(a: Estimate, b: Estimate, *, seed: int = 0) -> Difference:
    """a - b with a bootstrap interval and two-sided p-value.

    Paired when both estimates are over the same units (``a.units_hash == b.units_hash``, not None)
    and have replicates of equal length: those replicates come from the same resamples, so
    ``d* = a* - b*`` keeps the per-unit correlation and the interval is as narrow as the data
    allow. Otherwise unpaired: the two estimates are independent, and ``d* = a* - perm(b*)``. The
    replicates within one estimate are i.i.d. and so exchangeable; permuting b's breaks any
    coupling that the shared seed would otherwise create between the two sets of resamples.

    The p-value is two-sided, from the bootstrap standard error of d* (`_bootstrap_p`).
    """
    paired = (
        a.units_hash is not None
        and a.units_hash == b.units_hash
        and a.replicates is not None
        and b.replicates is not None
        and len(a.replicates) == len(b.replicates)
    )
    n_pairs = a.n if paired else min(a.n, b.n)
    if a.value is None or b.value is None:
        return Difference(None, None, None, None, n_pairs, paired, None, None)
    delta = a.value - b.value
    if a.replicates is None or b.replicates is None:
        return Difference(delta, None, None, None, n_pairs, paired, None, None)
    ra, rb = np.asarray(a.replicates, dtype=float), np.asarray(b.replicates, dtype=float)
    if not paired:
        m = min(ra.size, rb.size)
        ra, rb = ra[:m], np.random.default_rng(seed).permutation(rb)[:m]
    d = ra - rb
    d = d[~np.isnan(d)]
    if d.size == 0:
        return Difference(delta, None, None, None, n_pairs, paired, None, None)
    low, high = percentile_interval(d)
    sd_unit = float(d.std(ddof=1) * math.sqrt(n_pairs)) if d.size > 1 else None
    power_n = n_for_power(delta, sd_unit)
    return Difference(delta, low, high, _bootstrap_p(delta, d), n_pairs, paired, sd_unit, power_n)


def paired_values_difference(a_values, b_values, *, n_resamples=RESAMPLES, seed=0) -> Difference:
    """Paired difference of means from per-unit aligned values (a_values[i] and b_values[i] are
    the same unit). Units missing on either side are dropped from both before resampling."""
    a_arr, b_arr = _as_float_array(a_values), _as_float_array(b_values)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"aligned values differ in length: {a_arr.size} vs {b_arr.size}")
    both = ~(np.isnan(a_arr) | np.isnan(b_arr))
    kw = {"paired_over": "unit", "units_hash": "aligned", "n_resamples": n_resamples, "seed": seed}
    return difference(mean_estimate(a_arr[both], **kw), mean_estimate(b_arr[both], **kw), seed=seed)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (controls the family-wise error rate), in input order.

    The i-th smallest of m defined p-values becomes max_{j<=i} min(1, (m - j + 1) p_(j)).
    None (or NaN) stays None and does not count towards m.
    """
    defined = [(p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    m = len(defined)
    for rank, (p, i) in enumerate(sorted(defined)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def n_for_power(delta, sd_unit, power=0.8, alpha=0.05) -> int | None:
    """Units needed for a two-sided level-alpha z-test to detect ``delta`` with the given power:
    ``ceil(((z_{1-alpha/2} + z_power) * sd_unit / |delta|) ** 2)`` (at least 1).

    None when delta is 0 or either input is undefined.
    """
    if delta is None or sd_unit is None or delta == 0:
        return None
    if not (math.isfinite(delta) and math.isfinite(sd_unit)):
        return None
    z = norm.ppf(1.0 - alpha / 2.0) + norm.ppf(power)
    return max(1, math.ceil((z * sd_unit / abs(delta)) ** 2 - 1e-9))

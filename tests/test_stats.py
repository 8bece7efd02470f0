"""bench.stats against closed forms and scipy (fast unit tier)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from bench.stats import (
    Estimate,
    difference,
    holm,
    mean_estimate,
    n_for_power,
    paired_values_difference,
    percentile_interval,
    resample_indices,
    statistic_estimate,
)


def test_resample_indices_are_a_pure_function_of_their_arguments():
    idx = resample_indices(50, 200, seed=3)
    assert idx.shape == (200, 50) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() <= 49
    assert np.array_equal(idx, resample_indices(50, 200, seed=3))
    assert not np.array_equal(idx, resample_indices(50, 200, seed=4))
    assert resample_indices(0, 10).shape == (10, 0)


def test_bootstrap_se_of_a_mean_is_sd_over_root_n():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=200)
    est = mean_estimate(x, paired_over="unit", n_resamples=20000, seed=1)
    # The bootstrap distribution of the mean has sd = (plug-in sd) / sqrt(n) exactly.
    expected = x.std() / math.sqrt(x.size)
    assert est.replicates.std() == pytest.approx(expected, rel=0.03)
    assert est.value == pytest.approx(x.mean())
    assert est.replicates.mean() == pytest.approx(x.mean(), abs=0.05 * expected)


def test_percentile_interval_matches_scipy_bootstrap():
    x = np.random.default_rng(1).exponential(1.0, size=80)
    est = mean_estimate(x, paired_over="unit", n_resamples=20000, seed=2)
    ref = sps.bootstrap(
        (x,), np.mean, n_resamples=20000, method="percentile", random_state=np.random.default_rng(5)
    ).confidence_interval
    se = x.std() / math.sqrt(x.size)
    # Monte-Carlo error of each endpoint is ~0.02 se; a 90% interval would be off by ~0.3 se.
    assert est.ci_low == pytest.approx(ref.low, abs=0.15 * se)
    assert est.ci_high == pytest.approx(ref.high, abs=0.15 * se)


def test_percentile_interval_ignores_nan_and_uses_the_level():
    reps = np.concatenate([np.arange(101, dtype=float), [np.nan] * 7])
    assert percentile_interval(reps) == pytest.approx((2.5, 97.5))
    assert percentile_interval(reps, level=0.5) == pytest.approx((25.0, 75.0))
    assert percentile_interval(np.array([np.nan, np.nan])) == (None, None)
    assert percentile_interval(None) == (None, None)


def test_interval_brackets_the_value_and_shrinks_with_n():
    rng = np.random.default_rng(2)
    small = mean_estimate(rng.normal(size=20), paired_over="unit")
    large = mean_estimate(rng.normal(size=2000), paired_over="unit")
    for est in (small, large):
        assert est.ci_low < est.value < est.ci_high
    width = lambda e: e.ci_high - e.ci_low  # noqa: E731
    # Width scales as 1/sqrt(n): a factor of 10 here.
    assert 5 < width(small) / width(large) < 20


def test_mean_estimate_drops_missing_values_and_counts_them_out():
    est = mean_estimate([1.0, None, 3.0, float("nan"), 5.0], paired_over="concept", seed=0)
    assert est.value == 3.0 and est.n == 3 and est.reason is None
    assert est.paired_over == "concept"
    assert np.all(np.isin(est.replicates * 3, np.arange(3, 16)))  # means of 3 of {1, 3, 5}
    # A units_hash no longer describes the kept units, so it is not carried.
    assert mean_estimate([1.0, None, 2.0], paired_over="u", units_hash="h").units_hash is None
    assert mean_estimate([1.0, 2.0], paired_over="u", units_hash="h").units_hash == "h"


def test_mean_estimate_empty_and_single_value():
    empty = mean_estimate([None, float("nan")], paired_over="feature")
    assert empty.value is None and empty.ci_low is None and empty.ci_high is None
    assert empty.n == 0 and empty.reason == "no defined value" and empty.replicates is None
    one = mean_estimate([0.7], paired_over="feature")
    assert (one.value, one.ci_low, one.ci_high, one.n) == (0.7, 0.7, 0.7, 1)


def test_mean_estimate_is_deterministic_given_the_seed():
    x = np.random.default_rng(3).normal(size=30)
    a = mean_estimate(x, paired_over="u", seed=7)
    b = mean_estimate(x, paired_over="u", seed=7)
    c = mean_estimate(x, paired_over="u", seed=8)
    assert np.array_equal(a.replicates, b.replicates) and a == b
    assert not np.array_equal(a.replicates, c.replicates)


def _auroc_statistic(scores: np.ndarray, labels: np.ndarray):
    def auroc(idx: np.ndarray) -> float:
        s, y = scores[idx], labels[idx]
        pos, neg = s[y], s[~y]
        if pos.size == 0 or neg.size == 0:
            return float("nan")
        return float((pos[:, None] > neg).mean() + 0.5 * (pos[:, None] == neg).mean())

    return auroc


def test_statistic_estimate_auroc_with_undefined_replicates():
    rng = np.random.default_rng(4)
    labels = np.zeros(20, dtype=bool)
    labels[:2] = True  # few positives: ~12% of resamples have none
    scores = rng.normal(size=20) + 1.5 * labels
    est = statistic_estimate(
        20, _auroc_statistic(scores, labels), paired_over="test sentence", units_hash="h"
    )
    u = sps.mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert est.value == pytest.approx(u / (2 * 18))
    undefined = int(np.isnan(est.replicates).sum())
    assert 50 < undefined < 250  # expected (18/20)^20 * 1000 = 122
    assert est.reason == f"{undefined} of 1000 replicates undefined, dropped"
    assert est.replicates.shape == (1000,) and est.units_hash == "h" and est.n == 20
    assert 0.0 <= est.ci_low <= est.value <= est.ci_high <= 1.0


def test_statistic_estimate_undefined_value_and_agreement_with_mean_estimate():
    labels = np.zeros(10, dtype=bool)  # no positives at all
    est = statistic_estimate(10, _auroc_statistic(np.arange(10.0), labels), paired_over="u")
    assert est.value is None and est.reason == "statistic undefined"
    assert statistic_estimate(0, np.mean, paired_over="u").value is None
    # Same units, same seed -> same resamples as mean_estimate (what makes them pairable).
    x = np.random.default_rng(5).normal(size=25)
    by_stat = statistic_estimate(25, lambda i: x[i].mean(), paired_over="u", seed=3)
    by_mean = mean_estimate(x, paired_over="u", seed=3)
    assert np.allclose(by_stat.replicates, by_mean.replicates)
    assert by_stat.reason is None


def test_estimate_row_keys():
    row = mean_estimate([1.0, 2.0, 4.0], paired_over="concept", units_hash="abc").row()
    assert set(row) == {
        "value",
        "ci_low",
        "ci_high",
        "n",
        "paired_over",
        "units_hash",
        "reason",
        "replicates",
    }
    assert isinstance(row["replicates"], np.ndarray) and row["replicates"].shape == (1000,)
    assert row["n"] == 3 and row["units_hash"] == "abc"
    assert Estimate.missing("why").row()["replicates"] is None


def test_difference_of_identical_estimates_is_exactly_zero():
    est = mean_estimate(np.random.default_rng(6).normal(size=40), paired_over="u", units_hash="h")
    d = difference(est, est)
    assert d.paired and d.n_pairs == 40
    assert (d.delta, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0)
    assert d.p == 1.0 and d.n_for_power is None


def test_paired_difference_is_narrower_than_unpaired_on_correlated_data():
    rng = np.random.default_rng(7)
    unit = rng.normal(size=100)  # a shared per-unit effect (e.g. how hard a concept is)
    a_vals = unit + 0.2 + 0.1 * rng.normal(size=100)
    b_vals = unit + 0.1 * rng.normal(size=100)
    a = mean_estimate(a_vals, paired_over="concept", units_hash="same")
    b = mean_estimate(b_vals, paired_over="concept", units_hash="same")
    b_elsewhere = mean_estimate(b_vals, paired_over="concept", units_hash="other")
    paired, unpaired = difference(a, b), difference(a, b_elsewhere)
    assert paired.paired and not unpaired.paired
    assert paired.delta == pytest.approx(a_vals.mean() - b_vals.mean()) == unpaired.delta
    width = lambda d: d.ci_high - d.ci_low  # noqa: E731
    assert width(paired) < 0.3 * width(unpaired)
    assert paired.ci_low > 0 > unpaired.ci_low  # pairing is what separates them
    # Paired sd_unit is the sd of the per-unit differences; unpaired the two sds combined.
    assert paired.sd_unit == pytest.approx((a_vals - b_vals).std(), rel=0.1)
    assert unpaired.sd_unit == pytest.approx(math.hypot(a_vals.std(), b_vals.std()), rel=0.1)


def test_unpaired_without_a_shared_hash_or_equal_resamples():
    x = np.random.default_rng(8).normal(size=30)
    no_hash = mean_estimate(x, paired_over="u")
    assert not difference(no_hash, no_hash).paired  # None hashes never pair
    short = mean_estimate(x, paired_over="u", units_hash="h", n_resamples=500)
    long = mean_estimate(x, paired_over="u", units_hash="h", n_resamples=1000)
    d = difference(long, short)
    assert not d.paired and d.delta == 0.0 and d.ci_low < 0 < d.ci_high
    missing = difference(long, Estimate.missing("no defined value"))
    assert missing.delta is None and missing.p is None and missing.n_for_power is None


def test_p_value_is_two_sided_from_the_bootstrap_standard_error():
    from scipy.stats import norm

    reps = np.arange(-10, 90, dtype=float)  # 100 replicates
    a = Estimate(40.0, None, None, 10, "u", "h", reps)
    b = Estimate(0.0, None, None, 10, "u", "h", np.zeros(100))
    d = difference(a, b)
    se = reps.std(ddof=1)
    assert d.p == pytest.approx(2 * norm.sf(40.0 / se)) and isinstance(d.p, float)
    assert d.sd_unit == pytest.approx(se * math.sqrt(10))  # se * sqrt(n)
    assert d.n_for_power == n_for_power(40.0, d.sd_unit)
    # No 2 / (B + 1) floor: a difference of 20 standard errors is far below 1e-10, so Holm
    # over a report's whole family can still reach 0.05.
    clear = Estimate(
        20.0, None, None, 10, "u", "h", 20.0 + np.random.default_rng(0).normal(size=1000)
    )
    assert difference(clear, Estimate(0.0, None, None, 10, "u", "h", np.zeros(1000))).p < 1e-10


def test_p_value_small_for_a_clear_shift_large_for_none():
    rng = np.random.default_rng(9)
    a = rng.normal(size=100)
    shifted = paired_values_difference(a + 1.0 + 0.5 * rng.normal(size=100), a, seed=1)
    assert shifted.p < 0.01 and shifted.delta > 0.8
    noise = np.tile([0.3, -0.3], 50)  # differences with mean exactly 0
    null = paired_values_difference(a + noise, a, seed=1)
    assert null.delta == pytest.approx(0.0, abs=1e-12) and null.p > 0.5
    assert null.ci_low < 0 < null.ci_high


def test_p_value_is_roughly_uniform_under_the_null():
    rng = np.random.default_rng(10)
    ps = [
        paired_values_difference(
            rng.normal(size=40), rng.normal(size=40), n_resamples=500, seed=s
        ).p
        for s in range(300)
    ]
    rejected = np.mean(np.array(ps) < 0.05)
    assert 0.015 < rejected < 0.10  # nominal 0.05; binomial sd with 300 draws is 0.013


def test_paired_values_difference_drops_units_missing_on_either_side():
    d = paired_values_difference([1.0, None, 3.0, 4.0], [0.0, 1.0, float("nan"), 2.0], seed=0)
    assert d.paired and d.n_pairs == 2 and d.delta == pytest.approx(1.5)
    with pytest.raises(ValueError, match="length"):
        paired_values_difference([1.0, 2.0], [1.0], seed=0)


def test_holm_matches_a_hand_computed_example():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Capped at 1, and None/NaN pass through without counting towards m.
    assert holm([0.4, None, 0.3, float("nan")]) == [pytest.approx(0.6), None, 0.6, None]
    assert holm([None]) == [None] and holm([]) == []
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_holm_is_monotone_and_never_below_the_raw_p():
    p = np.random.default_rng(11).uniform(size=25) ** 3
    adj = np.array(holm(list(p)))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= 1)
    assert adj[order[0]] == pytest.approx(min(1, 25 * p[order[0]]))


def test_n_for_power_closed_form():
    assert n_for_power(0.5, 1.0) == 32  # ceil((1.95996 + 0.84162)^2 / 0.25) = ceil(31.4)
    assert n_for_power(-1.0, 2.0) == 32  # scale-free and sign-free
    assert n_for_power(0.5, 1.0, power=0.9) == 43  # ceil((1.95996 + 1.28155)^2 / 0.25)
    assert n_for_power(0.5, 1.0, alpha=0.01) == 47  # ceil((2.57583 + 0.84162)^2 / 0.25)
    assert n_for_power(0.0, 1.0) is None and n_for_power(None, 1.0) is None
    assert n_for_power(0.5, None) is None and n_for_power(0.5, 0.0) == 1


def test_a_paired_test_with_n_for_power_units_separates_80_percent_of_the_time():
    n = n_for_power(0.5, 1.0)
    rng = np.random.default_rng(12)
    hits = []
    for s in range(400):
        b = rng.normal(size=n)
        a = b + rng.normal(0.5, 1.0, size=n)  # per-unit difference: mean 0.5, sd 1
        hits.append(paired_values_difference(a, b, n_resamples=500, seed=s).p < 0.05)
    assert 0.72 < np.mean(hits) < 0.92  # 0.80 by design; binomial sd with 400 draws is 0.02


def test_difference_reports_the_units_needed_for_power():
    rng = np.random.default_rng(13)
    b = rng.normal(size=400)
    d = paired_values_difference(b + rng.normal(0.5, 1.0, size=400), b, seed=0)
    assert d.sd_unit == pytest.approx(1.0, rel=0.15)
    assert 20 <= d.n_for_power <= 48  # 32 for the true delta and sd

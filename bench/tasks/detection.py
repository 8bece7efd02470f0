"""Concept detection's bootstrap statistics over test sentences, computed for a whole
batch of resamples at once (`tasks/concept_detection.py` builds its intervals with them):
AUROCs of fixed (feature, concept) pairs from resample multiplicities, their mean and
coverage, and the share of features with a positive S_CD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import rankdata

from bench import stats


def auroc_matrix(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of every feature (columns of `scores`, S x k) for every
    concept (columns of the boolean `positives`, S x C): a C x k matrix.

    Mann-Whitney with average ranks, so ties count one half; a constant
    feature gets exactly 0.5.
    """
    ranks = rankdata(scores, axis=0)  # S x k, ties averaged
    n_pos = positives.sum(0).astype(float)  # C
    n_neg = positives.shape[0] - n_pos
    rank_sums = positives.T.astype(float) @ ranks  # C x k
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sums - n_pos[:, None] * (n_pos[:, None] + 1) / 2) / (n_pos * n_neg)[:, None]
    return auc


def best_feature_per_concept(
    train_auc: np.ndarray, concepts: list[str], labels: list[str] | None
) -> np.ndarray:
    """The one rule by which a concept gets a method's feature, in concept detection and in
    steering's concept protocol alike: a supervised method's own direction for the concept
    (`labels`, when it has one), else the feature with the best train-split AUROC (a NaN
    AUROC, a feature constant on the split, counts as 0.5). `train_auc` is C x k."""
    chosen = np.nan_to_num(train_auc, nan=0.5).argmax(axis=1)
    if labels:
        for c, concept in enumerate(concepts):
            if concept in labels:
                chosen[c] = labels.index(concept)
    return chosen


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half: `auroc_matrix` for one
    score column and one split into positives and negatives."""
    scores = np.concatenate([np.asarray(positive, float), np.asarray(negative, float)])
    positives = np.arange(len(scores)) < len(positive)
    return float(auroc_matrix(scores[:, None], positives[:, None])[0, 0])


def multiplicities(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float counts of each unit in each resample (rows of `indices`, B x len)."""
    rows = indices.shape[0]
    flat = (indices + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)


class ResampledAuroc:
    """The AUROC of fixed (score column, positive column) pairs on bootstrap resamples.

    A resample counts each unit with its multiplicity w, and AUROC x n_pos x n_neg is
    sum over (positive i, negative j) of w_i w_j ([s_j < s_i] + [s_j == s_i] / 2), so a
    batch of resamples is one matrix product with the fixed comparisons of every
    positive with every unit, made here: no sort per resample. On `arange(n)` it equals
    `auroc_matrix`. A pair without positives or negatives in a resample is NaN.
    """

    def __init__(self, scores: np.ndarray, positives: np.ndarray) -> None:
        n, m = scores.shape  # scores, positives: n x m, column j is pair j
        pair, unit = np.nonzero(positives.T)  # each positive of each pair
        other = scores[:, pair]  # n x P: every unit's score in that positive's column
        below = (other < scores[unit, pair]) + 0.5 * (other == scores[unit, pair])
        self.beats = below * ~positives[:, pair]  # what the positive wins against each negative
        self.unit = unit
        self.to_pair = np.zeros((len(pair), m))
        self.to_pair[np.arange(len(pair)), pair] = 1.0
        self.positives = positives.astype(float)
        self.n = n

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """AUROCs (m,) on one resample, or (B, m) on the rows of a B x len index array."""
        if indices.ndim == 1:
            return self(indices[None])[0]
        chunk = max(1, 4_000_000 // max(1, len(self.unit)))  # B x P temporaries of ~32 MB
        return np.concatenate(
            [self._batch(indices[i : i + chunk]) for i in range(0, len(indices), chunk)]
        )

    def _batch(self, indices: np.ndarray) -> np.ndarray:
        w = multiplicities(indices, self.n)  # B x n
        wins = ((w @ self.beats) * w[:, self.unit]) @ self.to_pair  # B x m
        n_pos = w @ self.positives
        n_neg = indices.shape[1] - n_pos
        with np.errstate(divide="ignore", invalid="ignore"):
            return wins / (n_pos * n_neg)


def pair_statistic(
    scores: np.ndarray,
    positives: np.ndarray,
    pair_features: np.ndarray,
    pair_concepts: np.ndarray,
    dead: np.ndarray,
    reduce: Callable[[np.ndarray], np.ndarray],
) -> Callable[[np.ndarray], np.ndarray]:
    """statistic(B x n indices) -> (B,): `reduce` (along axis 1) of the test AUROCs of the
    fixed (feature, concept) pairs on each resample of the test sentences; dead features
    stay at 0.5, as in the per-feature rows."""
    auroc = ResampledAuroc(scores[:, pair_features], positives[:, pair_concepts])
    fixed = dead[pair_features]

    def statistic(indices: np.ndarray) -> np.ndarray:
        auc = auroc(indices)
        auc[:, fixed] = 0.5
        return reduce(auc)

    return statistic


def mean_of(auc: np.ndarray) -> np.ndarray:
    return auc.mean(axis=1)  # NaN when some pair is undefined on the resample


def covered(threshold: float) -> Callable[[np.ndarray], np.ndarray]:
    def share(auc: np.ndarray) -> np.ndarray:
        covered = (auc >= threshold).mean(axis=1)
        return np.where(np.isfinite(auc).all(axis=1), covered, np.nan)

    return share


def s_cd_positive_statistic(
    scores: np.ndarray, concept: np.ndarray, neutral: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """statistic(B x n indices) -> (B,): share of features whose s_cd is defined and > 0 on
    each resample. scores, concept: n x k (concept[i, f]: sentence i is f's concept);
    neutral: n. A -inf score (a sentence without tokens) makes its mean undefined."""
    finite = np.isfinite(scores)
    values = np.where(finite, scores, 0.0)
    concept_f, neutral_f = concept.astype(float), neutral.astype(float)[:, None]
    sums = np.hstack([concept_f * values, neutral_f * values])  # n x 2k
    broken = np.hstack([concept_f * ~finite, neutral_f * ~finite])
    k = scores.shape[1]

    def statistic(indices: np.ndarray) -> np.ndarray:
        w = multiplicities(indices, scores.shape[0])  # B x n
        n_c, n_n = w @ concept_f, w @ neutral_f  # B x k, B x 1
        total, bad = w @ sums, (w @ broken) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_c, mean_n = total[:, :k] / n_c, total[:, k:] / n_n
            positive = (
                (n_c > 0)
                & (n_n > 0)
                & ~bad[:, :k]
                & ~bad[:, k:]
                & (mean_c > 0)
                & (mean_n > 0)
                & (np.log(mean_c / mean_n) > 0)
            )
        return positive.mean(axis=1)

    return statistic


def mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def s_cd_of(
    concept_scores, neutral_scores, where: str = "in the test split"
) -> tuple[float | None, str | None]:
    """log(mean concept score / mean neutral score), or None with the reason it is undefined
    (no sentences on a side, a mean <= 0 or -inf)."""
    if len(neutral_scores) == 0:
        return None, f"no neutral sentences {where}"
    if len(concept_scores) == 0:
        return None, f"no sentences of the concept {where}"
    mean_c, mean_n = float(np.mean(concept_scores)), float(np.mean(neutral_scores))
    if mean_c <= 0 or mean_n <= 0:
        return (
            None,
            f"log ratio undefined: mean concept score {mean_c:.4g}, mean neutral score {mean_n:.4g}",
        )
    return math.log(mean_c / mean_n), None


def summarize_reasons(reasons: list[str]) -> str:
    """'no neutral sentences in the test split (12 features)'; numbers after ':' dropped."""
    counts: dict[str, int] = {}
    for reason in reasons:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key} ({n} features)" for key, n in counts.items())


def fmt_estimate(estimate: stats.Estimate) -> str:
    if estimate.value is None:
        return "missing"
    if estimate.ci_low is None:
        return f"{estimate.value:.3f}"
    return f"{estimate.value:.3f} [{estimate.ci_low:.3f}, {estimate.ci_high:.3f}]"


def select_features(n_features: int, max_features: int | None, seed: int) -> list[int]:
    """A seeded uniform sample of feature indices (all when there are few, or for None), sorted."""
    if max_features is None or n_features <= max_features:
        return list(range(n_features))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_features, size=max_features, replace=False).tolist())


def concept_units(features: Any, data: Any, count: int | None, seed: int) -> tuple:
    """The concept-paired units: (concepts, concept -> feature, concept -> its train
    sentences, concept -> {"match_auroc"}). The concepts are a seeded sample of `count` of
    the dataset's (all when None or fewer); each gets the method's feature for it, as
    concept detection matches: its own label's direction for a supervised method, else the
    best train-split AUROC of the feature's native sentence scores."""
    concepts = data.dataset.concepts
    if count is not None and count < len(concepts):
        rng = np.random.default_rng(seed)
        picked = sorted(rng.choice(concepts, size=count, replace=False).tolist())
    else:
        picked = list(concepts)
    train = data.dataset.indices("train")
    labels = np.array(data.dataset.labels)[train]
    scores = data.encodings(features).sentences("native")[train]
    auc = np.nan_to_num(
        auroc_matrix(scores, labels[:, None] == np.array(concepts)[None, :]), nan=0.5
    )  # C x k
    sentences = np.array(data.dataset.sentences, dtype=object)[train]
    best = best_feature_per_concept(auc, concepts, features.labels)
    feature_of = {c: int(best[concepts.index(c)]) for c in picked}
    examples = {c: tuple(sentences[labels == c]) for c in picked}  # what the judge reads
    extra = {c: {"match_auroc": float(auc[concepts.index(c), feature_of[c]])} for c in picked}
    return picked, feature_of, examples, extra

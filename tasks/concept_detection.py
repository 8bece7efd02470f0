"""Concept detection: does a feature fire on the sentences of one concept?

A feature's token score comes from one of two encoders (the `encoder` column):

- `native`: the method's own `encode` (TopK codes, SNMF's coefficients, raw
  projections): what a user of the method gets;
- `projection`: the cosine of the token's activation with the feature's unit
  direction, the same for every method (the SNMF paper's concept evaluator),
  so differences between methods are differences between their directions,
  not between their encoders' sparsity. A zero direction or a zero activation
  has cosine 0.

Sentence score = max over the sentence's tokens (pad and BOS are never rows).
For each encoder separately, each feature is matched on the train split to the
concept with the highest one-vs-rest AUROC (a labeled feature, e.g.
DiffMean's, keeps its own label); on the test split we report

- per feature: `auroc` for its concept, and `s_cd` = log(mean score on the
  concept's sentences / mean score on neutral sentences), the SNMF paper's
  detection score (undefined when either mean is <= 0 or there are no neutral
  test sentences: a missing value with a reason);
- per concept: `concept_best_auroc`, the test AUROC of the feature with the
  best train AUROC for that concept (`selected_feature`);
- summary: `mean_feature_auroc`, `concept_coverage` (share of concepts whose
  `concept_best_auroc` >= `coverage_threshold`, also a column),
  `frac_s_cd_positive` (over all features: an undefined s_cd is not positive;
  `n_defined` says how many were defined; missing with a reason when none is),
  each with a 95% percentile-bootstrap interval over test sentences (the
  train matching stays fixed; `units_hash` pairs two methods on the same
  split), and `dead_features` (constant scores on the train split; their AUROC
  is 0.5).

`auroc_matrix` is the project's one AUROC implementation; the bootstrap
computes the same Mann-Whitney statistic from resample multiplicities.
Supervised features (with labels) were fitted on the same train split, so
their numbers are an upper reference for the unsupervised methods.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy.stats import rankdata

from bench import stats
from bench.datasets import NEUTRAL, ConceptDataset
from bench.encodings import ENCODERS
from bench.errors import ConfigError
from methods.base import Features
from tasks.base import Headline, Task, TaskData

log = logging.getLogger(__name__)

PAIRED_OVER = "test sentence"
BOOTSTRAP_SEED = 0  # one seed for every job: two methods on the same split get the same resamples


def sentence_scores(features: Features, data: TaskData, encoder: str = "native") -> np.ndarray:
    """S x k matrix: max over each sentence's tokens of the encoder's token score (the job's
    shared encodings, so a second caller encodes nothing)."""
    return data.encodings(features).sentences(encoder)


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


def units_hash(dataset: ConceptDataset, test: np.ndarray) -> str:
    """Same dataset content and same test sentences in the same order <=> same hash (the
    same id reconstruction gives the same units, through the one `bench.stats.units_hash`)."""
    return stats.units_hash(dataset.content_hash, [int(i) for i in test])


@dataclass
class ConceptDetection(Task):
    name: ClassVar[str] = "concept_detection"
    title: ClassVar[str] = "Concept detection"
    headlines: ClassVar[tuple[Headline, ...]] = (
        Headline("mean_feature_auroc"),
        Headline("concept_coverage"),
        Headline("frac_s_cd_positive"),
    )
    report_order: ClassVar[int] = 1
    #: one-vs-rest AUROC and per-concept matching need at least this many concepts
    min_concepts: ClassVar[int] = 2
    #: S_CD's denominator is the mean score on neutral test sentences
    needs_neutral: ClassVar[bool] = True

    coverage_threshold: float = 0.9  # a concept counts as covered at AUROC >= 0.9
    # both: the method's own encoder and the cosine every method shares (direction quality)
    encoders: list[str] = field(default_factory=lambda: ["native", "projection"])
    resamples: int = stats.RESAMPLES  # bootstrap resamples of the test sentences per interval

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage_threshold <= 1.0:
            raise ConfigError(
                f"task.concept_detection.coverage_threshold={self.coverage_threshold}: "
                "must be in [0, 1] (an AUROC)"
            )
        self.encoders = [str(e) for e in self.encoders]
        unknown = [e for e in self.encoders if e not in ENCODERS]
        if unknown or not self.encoders or len(set(self.encoders)) != len(self.encoders):
            raise ConfigError(
                f"task.concept_detection.encoders={self.encoders}: choose one or more of "
                f"{list(ENCODERS)}, each once"
            )
        if self.resamples < 1:
            raise ConfigError(f"task.concept_detection.resamples={self.resamples}: must be >= 1")

    def check_dataset(self, dataset: ConceptDataset) -> list[str]:
        return [f"{w} (every s_cd, and frac_s_cd_positive)" for w in super().check_dataset(dataset)]

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        dataset = data.dataset
        concepts = dataset.concepts
        if len(concepts) < self.min_concepts:
            raise ConfigError(
                f"concept_detection needs at least {self.min_concepts} concepts besides "
                f"neutral; the dataset has {concepts}"
            )
        rows: list[dict] = []
        for encoder in self.encoders:
            scores = sentence_scores(features, data, encoder)
            for row in self._score(scores, features, dataset, encoder):
                rows.append({**row, "encoder": encoder})
        supervised = features.labels is not None  # fitted with the labels: an upper reference
        for row in rows:
            row["supervised"] = supervised
        return rows

    def _score(
        self, scores: np.ndarray, features: Features, dataset: ConceptDataset, encoder: str
    ) -> list[dict]:
        """One encoder's rows, from its S x k sentence scores."""
        concepts = dataset.concepts
        labels = np.array(dataset.labels)
        positives = labels[:, None] == np.array(concepts)[None, :]  # S x C
        train, test = dataset.indices("train"), dataset.indices("test")
        train_auc = auroc_matrix(scores[train], positives[train])  # C x k
        dead = np.ptp(scores[train], axis=0) == 0
        assigned = self._assign(features, train_auc, concepts)
        test_auc = auroc_matrix(scores[test], positives[test])
        test_auc[:, dead] = 0.5
        neutral_test = test[labels[test] == NEUTRAL]

        rows: list[dict] = []
        s_cd_values = []
        for f, c in enumerate(assigned):
            concept = concepts[c]
            rows.append({"feature": f, "concept": concept, "metric": "auroc", "value": float(test_auc[c, f])})  # fmt: skip
            value, reason = _s_cd(scores[test[positives[test, c]], f], scores[neutral_test, f])
            if value is not None:
                s_cd_values.append(value)
            rows.append({"feature": f, "concept": concept, "metric": "s_cd", "value": value, "reason": reason})  # fmt: skip
        # Per concept, the feature chosen on the train split (not the test maximum,
        # which would grow with the number of features), scored on the test split.
        chosen = np.nan_to_num(train_auc, nan=0.5).argmax(axis=1)  # C
        best = test_auc[np.arange(len(concepts)), chosen]
        for c, concept in enumerate(concepts):
            rows.append(
                {"concept": concept, "metric": "concept_best_auroc", "value": float(best[c]),
                 "selected_feature": int(chosen[c])}
            )  # fmt: skip

        test_scores, test_pos = scores[test], positives[test]
        estimate = self._estimator(len(test), units_hash(dataset, test))
        features_idx, concepts_idx = np.arange(len(assigned)), np.arange(len(concepts))
        mean_auroc = estimate(
            _pair_statistic(test_scores, test_pos, features_idx, np.array(assigned), dead, _mean)
        )
        coverage = estimate(
            _pair_statistic(
                test_scores, test_pos, chosen, concepts_idx, dead, _covered(self.coverage_threshold)
            )
        )
        if s_cd_values:
            s_cd_positive = estimate(
                _s_cd_positive_statistic(
                    test_scores, test_pos[:, assigned], labels[test] == NEUTRAL
                )
            )
        else:
            reasons = [r["reason"] for r in rows if r["metric"] == "s_cd"]
            s_cd_positive = stats.Estimate.missing(
                "no feature has a defined s_cd: " + _summarize(reasons), paired_over=PAIRED_OVER
            )
        rows += [
            {"metric": "mean_feature_auroc", **mean_auroc.row()},
            {"metric": "concept_coverage", **coverage.row(), "threshold": self.coverage_threshold},
            {"metric": "frac_s_cd_positive", **s_cd_positive.row(), "n_defined": len(s_cd_values)},
            {"metric": "dead_features", "value": float(dead.sum()), "n": len(features)},
        ]
        log.info(
            "concept_detection (%s encoder): mean AUROC %s, coverage %s, %d dead of %d features",
            encoder, _fmt(mean_auroc), _fmt(coverage), int(dead.sum()), len(features),
        )  # fmt: skip
        return rows

    def _estimator(self, n: int, hash_: str) -> Callable[[Callable], stats.Estimate]:
        """estimate(batch_statistic): `stats.statistic_estimate` over the n test sentences,
        with the replicates computed in one batch (its resamples are a pure function of
        (n, resamples, seed)) and handed to it by resample."""

        def estimate(batch: Callable[[np.ndarray], np.ndarray]) -> stats.Estimate:
            indices = np.vstack(
                [np.arange(n)[None], stats.resample_indices(n, self.resamples, BOOTSTRAP_SEED)]
            )
            table = {
                row.tobytes(): float(v) for row, v in zip(indices, batch(indices), strict=True)
            }

            def statistic(row: np.ndarray) -> float:
                row = np.asarray(row, dtype=np.int64)
                found = table.get(row.tobytes())
                return float(batch(row[None])[0]) if found is None else found

            return stats.statistic_estimate(
                n,
                statistic,
                paired_over=PAIRED_OVER,
                units_hash=hash_,
                n_resamples=self.resamples,
                seed=BOOTSTRAP_SEED,
            )

        return estimate

    @staticmethod
    def _assign(features: Features, train_auc: np.ndarray, concepts: list[str]) -> list[int]:
        """Each feature's concept: its own label if it has one, else the train-split argmax."""
        chosen = np.nan_to_num(train_auc, nan=0.5).argmax(axis=0).tolist()
        if features.labels is None:
            return chosen
        return [
            concepts.index(label) if label in concepts else pick
            for label, pick in zip(features.labels, chosen, strict=True)
        ]


def _pair_statistic(
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


def _mean(auc: np.ndarray) -> np.ndarray:
    return auc.mean(axis=1)  # NaN when some pair is undefined on the resample


def _covered(threshold: float) -> Callable[[np.ndarray], np.ndarray]:
    def share(auc: np.ndarray) -> np.ndarray:
        covered = (auc >= threshold).mean(axis=1)
        return np.where(np.isfinite(auc).all(axis=1), covered, np.nan)

    return share


def _s_cd_positive_statistic(
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
                (n_c > 0) & (n_n > 0) & ~bad[:, :k] & ~bad[:, k:] & (mean_c > 0) & (mean_n > 0)
                & (np.log(mean_c / mean_n) > 0)
            )  # fmt: skip
        return positive.mean(axis=1)

    return statistic


def _s_cd(
    concept_scores: np.ndarray, neutral_scores: np.ndarray
) -> tuple[float | None, str | None]:
    if len(neutral_scores) == 0:
        return None, "no neutral sentences in the test split"
    if len(concept_scores) == 0:
        return None, "no sentences of the concept in the test split"
    mean_c, mean_n = float(np.mean(concept_scores)), float(np.mean(neutral_scores))
    if mean_c <= 0 or mean_n <= 0:
        return (
            None,
            f"log ratio undefined: mean concept score {mean_c:.4g}, mean neutral score {mean_n:.4g}",
        )
    return math.log(mean_c / mean_n), None


def _summarize(reasons: list[str]) -> str:
    """'no neutral sentences in the test split (12 features)'; numbers after ':' dropped."""
    counts: dict[str, int] = {}
    for reason in reasons:
        key = reason.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key} ({n} features)" for key, n in counts.items())


def _fmt(estimate: stats.Estimate) -> str:
    if estimate.value is None:
        return "missing"
    if estimate.ci_low is None:
        return f"{estimate.value:.3f}"
    return f"{estimate.value:.3f} [{estimate.ci_low:.3f}, {estimate.ci_high:.3f}]"

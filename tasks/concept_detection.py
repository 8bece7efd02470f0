"""Concept detection: does a feature fire on the sentences of one concept?

Sentence score = max over the sentence's tokens (pad and BOS are never rows)
of the feature's `encode` value. On the train split each feature is matched
to the concept with the highest one-vs-rest AUROC (a labeled feature, e.g.
DiffMean's, keeps its own label); on the test split we report

- per feature: `auroc` for its concept, and `s_cd` = log(mean score on the
  concept's sentences / mean score on neutral sentences), the SNMF paper's
  detection score (undefined when either mean is <= 0: a missing value with
  a reason);
- per concept: `concept_best_auroc`, the test AUROC of the feature with the
  best train AUROC for that concept (`selected_feature`);
- summary: `mean_feature_auroc`, `concept_coverage` (share of concepts whose
  `concept_best_auroc` >= `coverage_threshold`, also a column),
  `frac_s_cd_positive` (over all features: an undefined s_cd is not positive;
  `n_defined` says how many were defined), `dead_features` (constant scores on
  the train split; their AUROC is 0.5).

Supervised features (with labels) were fitted on the same train split, so
their numbers are an upper reference for the unsupervised methods.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.stats import rankdata

from bench.contexts import encode_all, sentence_max
from bench.datasets import NEUTRAL
from bench.errors import ConfigError
from methods.base import Features
from tasks.base import Task, TaskData

log = logging.getLogger(__name__)


def sentence_scores(features: Features, data: TaskData) -> np.ndarray:
    """S x k matrix: max over each sentence's tokens of the encoded activation."""
    acts = data.activations
    return sentence_max(encode_all(features, acts), acts.sentence_ids, len(data.dataset)).numpy()


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


@dataclass
class ConceptDetection(Task):
    name: ClassVar[str] = "concept_detection"
    #: one-vs-rest AUROC and per-concept matching need at least this many concepts
    min_concepts: ClassVar[int] = 2

    coverage_threshold: float = 0.9  # a concept counts as covered at AUROC >= 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage_threshold <= 1.0:
            raise ConfigError(
                f"task.concept_detection.coverage_threshold={self.coverage_threshold}: "
                "must be in [0, 1] (an AUROC)"
            )

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        dataset = data.dataset
        concepts = dataset.concepts
        if len(concepts) < self.min_concepts:
            raise ConfigError(
                f"concept_detection needs at least {self.min_concepts} concepts besides "
                f"neutral; the dataset has {concepts}"
            )
        labels = np.array(dataset.labels)
        positives = labels[:, None] == np.array(concepts)[None, :]  # S x C
        scores = sentence_scores(features, data)
        train, test = dataset.indices("train"), dataset.indices("test")

        train_auc = auroc_matrix(scores[train], positives[train])  # C x k
        dead = np.ptp(scores[train], axis=0) == 0
        assigned = self._assign(features, train_auc, concepts)
        test_auc = auroc_matrix(scores[test], positives[test])
        test_auc[:, dead] = 0.5
        neutral_test = test[labels[test] == NEUTRAL]

        rows: list[dict] = []
        feature_aucs, s_cd_values = [], []
        for f, c in enumerate(assigned):
            auc = float(test_auc[c, f])
            feature_aucs.append(auc)
            rows.append({"feature": f, "concept": concepts[c], "metric": "auroc", "value": auc})
            concept_test = test[positives[test, c]]
            value, reason = _s_cd(scores[concept_test, f], scores[neutral_test, f])
            if value is not None:
                s_cd_values.append(value)
            rows.append(
                {
                    "feature": f,
                    "concept": concepts[c],
                    "metric": "s_cd",
                    "value": value,
                    "reason": reason,
                }
            )
        # Per concept, the feature chosen on the train split (not the test maximum,
        # which would grow with the number of features), scored on the test split.
        chosen = np.nan_to_num(train_auc, nan=0.5).argmax(axis=1)  # C
        best = test_auc[np.arange(len(concepts)), chosen]
        for c, concept in enumerate(concepts):
            rows.append(
                {"concept": concept, "metric": "concept_best_auroc", "value": float(best[c]),
                 "selected_feature": int(chosen[c])}
            )  # fmt: skip
        coverage = float((best >= self.coverage_threshold).mean())
        rows += [
            {"metric": "mean_feature_auroc", "value": float(np.mean(feature_aucs))},
            {"metric": "concept_coverage", "value": coverage, "threshold": self.coverage_threshold},
            {  # over all features: an undefined s_cd is not a positive one
                "metric": "frac_s_cd_positive",
                "value": float(sum(v > 0 for v in s_cd_values) / len(features)),
                "n_defined": len(s_cd_values),
            },
            {"metric": "dead_features", "value": float(dead.sum())},
        ]
        supervised = features.labels is not None  # fitted with the labels: an upper reference
        for row in rows:
            row["supervised"] = supervised
        log.info(
            "concept_detection: mean AUROC %.3f, coverage %.2f, %d dead of %d features",
            np.mean(feature_aucs), coverage, int(dead.sum()), len(features),
        )  # fmt: skip
        return rows

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

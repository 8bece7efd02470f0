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
computes the same Mann-Whitney statistic from resample multiplicities
(`bench/tasks/detection.py`). Supervised features (with labels) were fitted on
the same train split, so their numbers are an upper reference for the
unsupervised methods.

`protocol: paper` is the SNMF paper's detection instead (`bench/tasks/sentences.py`):
no dataset labels, no split. For each feature (`max_features`, null = all), a writing
judge describes it from its top train tokens in context (the input-centric description,
`bench/tasks/descriptions.py`) and writes 5 activating and 5 neutral sentences from that
description; the sentence score is the max over its tokens of each encoder's score
(the paper's: `projection`), and per feature `s_cd` = log(mean activating / mean
neutral) over all 10 sentences. Summaries: `frac_s_cd_positive` and `mean_s_cd` with
95% intervals over features. The sentences and scores are written to the job's
`generated_sentences.json`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from bench import stats
from bench.data.datasets import NEUTRAL, ConceptDataset
from bench.errors import ConfigError
from bench.fit.encodings import ENCODERS
from bench.fit.features import Features
from bench.judges.base import Judge
from bench.tasks.base import PROTOCOL, Headline, Task, TaskData
from bench.tasks.detection import (  # noqa: F401  (auroc_matrix, ResampledAuroc: this module's interface)
    ResampledAuroc,
    auroc_matrix,
    best_feature_per_concept,
    covered,
    fmt_estimate,
    mean_of,
    mean_or_none,
    pair_statistic,
    s_cd_of,
    s_cd_positive_statistic,
    select_features,
    summarize_reasons,
)
from bench.tasks.paper_detection import DESCRIPTIONS, paper_detection
from bench.tasks.sentences import MAX_FAILURES, N_SENTENCES

log = logging.getLogger(__name__)

PROTOCOLS = ("dataset", "paper")
#: the encoders each protocol scores with (`encoders: protocol`): both on the dataset; the
#: paper's cosine with the unit direction on its generated sentences
ENCODERS_BY_PROTOCOL = {"dataset": ["native", "projection"], "paper": ["projection"]}
PAIRED_OVER = "test sentence"
BOOTSTRAP_SEED = 0  # one seed for every job: two methods on the same split get the same resamples


def sentence_scores(features: Features, data: TaskData, encoder: str = "native") -> np.ndarray:
    """S x k matrix: max over each sentence's tokens of the encoder's token score (the job's
    shared encodings, so a second caller encodes nothing)."""
    return data.encodings(features).sentences(encoder)


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

    # dataset: the labelled test sentences (AUROC, coverage, S_CD against neutral ones);
    # paper: the SNMF paper's sentences written per feature by a writing judge
    protocol: str = "dataset"
    coverage_threshold: float = 0.9  # a concept counts as covered at AUROC >= 0.9
    # protocol: the protocol's (ENCODERS_BY_PROTOCOL); native = the method's own encoder,
    # projection = the cosine every method shares (direction quality)
    encoders: list[str] | str = PROTOCOL
    resamples: int = stats.RESAMPLES  # bootstrap resamples per interval
    # paper protocol only: features described and scored (null = all, the paper's), sentences
    # per kind (the paper's 5), empty or repeated replies allowed per kind (the paper's 10),
    # and what the sentences are written from: input_centric (the paper's, judge-written) |
    # tokens (featbench's top train tokens, for a writer too weak for the answer format)
    max_features: int | None = None
    sentences: int = N_SENTENCES
    max_failed_tries: int = MAX_FAILURES
    description: str = "input_centric"

    @property
    def needs_judge(self) -> bool:  # type: ignore[override]
        """The paper protocol's sentences are written by a judge; the dataset's are shipped."""
        return self.protocol == "paper"

    @property
    def min_concepts(self) -> int:  # type: ignore[override]
        """One-vs-rest AUROC and per-concept matching need two concepts; the paper none."""
        return 2 if self.protocol == "dataset" else 0

    @property
    def needs_neutral(self) -> bool:  # type: ignore[override]
        """The dataset's S_CD divides by neutral test sentences; the paper writes its own."""
        return self.protocol == "dataset"

    @property
    def needs_test_split(self) -> bool:  # type: ignore[override]
        """The dataset protocol scores test sentences; the paper's, sentences it writes."""
        return self.protocol == "dataset"

    def check_judge(self, judge: Judge | None) -> None:
        if self.protocol == "paper" and not getattr(judge, "can_write", False):
            name = judge.label() if judge is not None else "none"
            raise ConfigError(
                f"task.concept_detection.protocol=paper needs a judge that writes descriptions "
                f"and sentences (judge=openai or judge=hf_chat); judge {name} cannot"
            )

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"task.concept_detection.protocol={self.protocol!r}: must be one of {list(PROTOCOLS)}"
            )
        if self.encoders == PROTOCOL:
            self.encoders = list(ENCODERS_BY_PROTOCOL[self.protocol])
        if isinstance(self.encoders, str) or not self.encoders:
            raise ConfigError(
                f"task.concept_detection.encoders={self.encoders!r}: must be a non-empty list of "
                f"{sorted(ENCODERS)} or protocol"
            )
        for key in ("sentences", "max_failed_tries"):
            if getattr(self, key) < 1:
                raise ConfigError(
                    f"task.concept_detection.{key}={getattr(self, key)}: must be >= 1"
                )
        if self.description not in DESCRIPTIONS:
            raise ConfigError(
                f"task.concept_detection.description={self.description!r}: must be one of "
                f"{list(DESCRIPTIONS)}"
            )
        if self.max_features is not None and self.max_features < 1:
            raise ConfigError(
                f"task.concept_detection.max_features={self.max_features}: must be >= 1 or null (all)"
            )
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
        if self.protocol == "paper":
            return self._paper(model, features, data)
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
            rows.append(
                {
                    "feature": f,
                    "concept": concept,
                    "metric": "auroc",
                    "value": float(test_auc[c, f]),
                }
            )
            value, reason = s_cd_of(scores[test[positives[test, c]], f], scores[neutral_test, f])
            if value is not None:
                s_cd_values.append(value)
            rows.append(
                {
                    "feature": f,
                    "concept": concept,
                    "metric": "s_cd",
                    "value": value,
                    "reason": reason,
                }
            )
        # Per concept, the feature chosen on the train split (not the test maximum,
        # which would grow with the number of features), scored on the test split.
        chosen = best_feature_per_concept(train_auc, concepts, features.labels)  # C
        best = test_auc[np.arange(len(concepts)), chosen]
        for c, concept in enumerate(concepts):
            rows.append(
                {
                    "concept": concept,
                    "metric": "concept_best_auroc",
                    "value": float(best[c]),
                    "selected_feature": int(chosen[c]),
                }
            )

        test_scores, test_pos = scores[test], positives[test]
        estimate = self._estimator(len(test), units_hash(dataset, test))
        features_idx, concepts_idx = np.arange(len(assigned)), np.arange(len(concepts))
        mean_auroc = estimate(
            pair_statistic(test_scores, test_pos, features_idx, np.array(assigned), dead, mean_of)
        )
        coverage = estimate(
            pair_statistic(
                test_scores, test_pos, chosen, concepts_idx, dead, covered(self.coverage_threshold)
            )
        )
        if s_cd_values:
            s_cd_positive = estimate(
                s_cd_positive_statistic(test_scores, test_pos[:, assigned], labels[test] == NEUTRAL)
            )
        else:
            reasons = [r["reason"] for r in rows if r["metric"] == "s_cd"]
            s_cd_positive = stats.Estimate.missing(
                "no feature has a defined s_cd: " + summarize_reasons(reasons),
                paired_over=PAIRED_OVER,
            )
        rows += [
            {"metric": "mean_feature_auroc", **mean_auroc.row()},
            {"metric": "concept_coverage", **coverage.row(), "threshold": self.coverage_threshold},
            {"metric": "frac_s_cd_positive", **s_cd_positive.row(), "n_defined": len(s_cd_values)},
            {"metric": "dead_features", "value": float(dead.sum()), "n": len(features)},
        ]
        log.info(
            "concept_detection (%s encoder): mean AUROC %s, coverage %s, %d dead of %d features",
            encoder,
            fmt_estimate(mean_auroc),
            fmt_estimate(coverage),
            int(dead.sum()),
            len(features),
        )
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

    # --- the paper's protocol ----------------------------------------------------------

    def _paper(self, model: Any, features: Features, data: TaskData) -> list[dict]:
        """Describe -> write sentences -> score them -> S_CD, per feature; summaries over
        features (units: the features scored, `paired_over` feature):
        `bench/tasks/paper_detection.py`."""
        self.check_judge(data.judge)
        return paper_detection(self, model, features, data)

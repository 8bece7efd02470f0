"""Concept detection on planted features: known AUROC, coverage and S_CD, both encoders,
bootstrap intervals over test sentences, and missing summaries with their reasons."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import stats
from bench.data.datasets import NEUTRAL, ConceptDataset
from bench.fit.encodings import projection_codes
from featbench.methods.base import ActivationSet, Features
from featbench.tasks.base import Task, TaskData
from featbench.tasks.concept_detection import (
    ConceptDetection,
    ResampledAuroc,
    auroc_matrix,
    units_hash,
)

COPIES = 10  # each planted test sentence appears this many times: AUROC unchanged, n = 40
# feature 0, feature 1 scores per (split, label); feature 0 on test: A {3, 1} vs B {2}, neutral
# {0.5}: of the 4 (A, other) value pairs, 3 are won -> AUROC 3/4; S_CD = log(2 / 0.5) = log 4.
# feature 1 on test: B {5} vs {0, 1}: AUROC 1; S_CD = log(5 / 1) = log 5.
TRAIN = {"a": [(4.0, 0.0)], "b": [(0.0, 4.0)], NEUTRAL: [(0.1, 0.1)]}
TEST = {"a": [(3.0, 0.0), (1.0, 0.0)], "b": [(2.0, 5.0)], NEUTRAL: [(0.5, 1.0)]}


def _planted(with_neutral: bool = True, copies: int = COPIES):
    """A dataset with 2 tokens per sentence (the planted vector, then a quarter of it), so
    the sentence score (max over tokens) is the planted value; directions e0, e1 in d=3."""
    sentences, labels, splits, vectors = [], [], [], []
    for split, table in (("train", TRAIN), ("test", TEST)):
        for label, values in table.items():
            if label == NEUTRAL and not with_neutral:
                continue
            for i in range(copies):
                for value in values:
                    sentences.append(f"{split} {label} {value} {i}")
                    labels.append(label)
                    splits.append(split)
                    vectors.append([*value, 0.0])
    dataset = ConceptDataset(tuple(sentences), tuple(labels), tuple(splits), "planted")
    x = torch.tensor(vectors)
    acts = torch.stack([x, x / 4], dim=1).reshape(-1, 3)  # rows: sentence 0 tok 0, tok 1, ...
    sentence_ids = torch.arange(len(sentences)).repeat_interleave(2)
    n = len(acts)
    activations = ActivationSet(
        acts, torch.zeros(n, dtype=torch.long), sentence_ids, torch.arange(n) % 2 + 1, "h", labels
    )
    return dataset, activations


def _data(dataset, activations, tmp_path) -> TaskData:
    return TaskData(dataset=dataset, activations=activations, seed=0, output_dir=tmp_path)


def _features(directions) -> Features:
    return Features(torch.tensor(directions, dtype=torch.float), method="planted", hook="h")


E01 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def _rows(rows, encoder="native", **match):
    return [
        r for r in rows if r["encoder"] == encoder and all(r.get(k) == v for k, v in match.items())
    ]


def _summary(rows, metric, encoder="native"):
    [row] = [
        r for r in _rows(rows, encoder, metric=metric) if "feature" not in r and "concept" not in r
    ]
    return row


def _evaluate(tmp_path, directions=E01, with_neutral=True, **task):
    dataset, acts = _planted(with_neutral)
    task.setdefault("resamples", 200)
    return ConceptDetection(**task).evaluate(
        None, _features(directions), _data(dataset, acts, tmp_path), None
    )


def test_planted_feature_has_the_hand_computed_auroc_coverage_and_s_cd(tmp_path):
    rows = _evaluate(tmp_path, encoders=["native"])
    auroc = {r["feature"]: (r["concept"], r["value"]) for r in _rows(rows, metric="auroc")}
    assert auroc == {0: ("a", pytest.approx(0.75)), 1: ("b", pytest.approx(1.0))}
    s_cd = {r["feature"]: r["value"] for r in _rows(rows, metric="s_cd")}
    assert s_cd == {0: pytest.approx(math.log(4)), 1: pytest.approx(math.log(5))}
    best = {
        r["concept"]: (r["selected_feature"], r["value"])
        for r in _rows(rows, metric="concept_best_auroc")
    }
    assert best == {"a": (0, pytest.approx(0.75)), "b": (1, pytest.approx(1.0))}
    assert _summary(rows, "mean_feature_auroc")["value"] == pytest.approx(0.875)
    assert _summary(rows, "concept_coverage")["value"] == pytest.approx(0.5)  # a: 0.75 < 0.9
    assert _summary(rows, "frac_s_cd_positive")["value"] == pytest.approx(1.0)
    assert _summary(rows, "dead_features")["value"] == 0
    lower = _evaluate(tmp_path, encoders=["native"], coverage_threshold=0.7)
    assert _summary(lower, "concept_coverage")["value"] == pytest.approx(1.0)


def test_every_row_names_its_encoder_and_both_encoders_are_scored(tmp_path):
    rows = _evaluate(tmp_path)
    assert {r["encoder"] for r in rows} == {"native", "projection"}
    for encoder in ("native", "projection"):
        metrics = {r["metric"] for r in _rows(rows, encoder)}
        assert metrics == {
            "auroc",
            "s_cd",
            "concept_best_auroc",
            "mean_feature_auroc",
            "concept_coverage",
            "frac_s_cd_positive",
            "dead_features",
        }
    assert len(_rows(rows, "projection", metric="auroc")) == 2


def test_projection_encoder_is_the_cosine_with_the_unit_direction(tmp_path):
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(50, 6)), dtype=torch.float)
    x[3] = 0.0  # a zero activation has cosine 0
    directions = torch.tensor(
        rng.normal(size=(4, 6)) * [[1.0], [5.0], [0.1], [2.0]], dtype=torch.float
    )
    acts = ActivationSet(
        x,
        torch.zeros(50, dtype=torch.long),
        torch.arange(50),
        torch.ones(50, dtype=torch.long),
        "h",
    )
    codes = projection_codes(Features(directions, method="m", hook="h"), acts, chunk=7).numpy()
    xn, dn = x.numpy(), directions.numpy()
    with np.errstate(invalid="ignore"):
        cosine = (
            (xn @ dn.T) / np.linalg.norm(xn, axis=1)[:, None] / np.linalg.norm(dn, axis=1)[None]
        )
    cosine[3] = 0.0
    np.testing.assert_allclose(codes, cosine, atol=1e-6)
    # In the task: a scaled direction with an offset activation changes the native scores but
    # the projection rows are the AUROCs of the cosine, however the direction is scaled.
    dataset, planted = _planted()
    planted.acts[:, 2] = 1.0
    rows = ConceptDetection(resamples=20).evaluate(
        None, _features([[3.0, 0.0, 0.0], [0.0, 0.2, 0.0]]), _data(dataset, planted, tmp_path), None
    )
    a = planted.acts.numpy()
    token_cos = a[:, :2] / np.linalg.norm(a, axis=1)[:, None]
    sentence = np.maximum(token_cos[0::2], token_cos[1::2])  # 2 tokens per sentence
    labels = np.array(dataset.labels)
    test = dataset.indices("test")
    expected = auroc_matrix(sentence[test], labels[test, None] == np.array(["a", "b"])[None])
    got = {r["feature"]: r["value"] for r in _rows(rows, "projection", metric="auroc")}
    assert got == {0: pytest.approx(expected[0, 0]), 1: pytest.approx(expected[1, 1])}


def test_all_undefined_s_cd_is_a_missing_summary_with_its_reason(tmp_path):
    rows = _evaluate(tmp_path, with_neutral=False)
    for encoder in ("native", "projection"):
        assert all(r["value"] is None and r["reason"] for r in _rows(rows, encoder, metric="s_cd"))
        frac = _summary(rows, "frac_s_cd_positive", encoder)
        assert frac["value"] is None and frac["ci_low"] is None and frac["n_defined"] == 0
        assert "no neutral sentences in the test split (2 features)" in frac["reason"]
    # the rest stands: without the neutral 0.5, feature 0's negatives are B's 2 only -> 1/2
    assert _summary(rows, "mean_feature_auroc")["value"] == pytest.approx((0.5 + 1.0) / 2)


def test_check_dataset_warns_when_a_task_needs_neutral_sentences_and_there_are_none():
    task = ConceptDetection()
    assert task.needs_neutral and Task.needs_neutral is False
    with_neutral, _ = _planted(copies=1)
    without, _ = _planted(with_neutral=False, copies=1)
    assert task.check_dataset(with_neutral) == []
    [warning] = task.check_dataset(without)
    assert "'neutral' sentences in the test split" in warning and "planted" in warning
    assert "frac_s_cd_positive" in warning


def test_intervals_bracket_the_value_and_pair_two_feature_sets_on_the_same_split(tmp_path):
    rows = _evaluate(tmp_path, resamples=300)
    other = _evaluate(tmp_path, directions=[[1.0, 0.5, 0.0], [0.2, 1.0, 0.0]], resamples=300)
    for metric in ("mean_feature_auroc", "concept_coverage", "frac_s_cd_positive"):
        for encoder in ("native", "projection"):
            row = _summary(rows, metric, encoder)
            assert row["ci_low"] <= row["value"] <= row["ci_high"], (metric, encoder, row)
            assert row["n"] == 40 and row["paired_over"] == "test sentence"
            assert len(row["replicates"]) == 300
    a, b = _summary(rows, "mean_feature_auroc"), _summary(other, "mean_feature_auroc")
    assert a["ci_low"] < a["value"] < a["ci_high"]  # a real interval, not a point
    assert a["units_hash"] == b["units_hash"] is not None
    dataset, _ = _planted()
    assert a["units_hash"] == units_hash(dataset, dataset.indices("test"))

    def estimate(r):
        keys = ("value", "ci_low", "ci_high", "n", "paired_over", "units_hash", "replicates")
        return stats.Estimate(*(r[k] for k in keys))

    assert stats.difference(estimate(a), estimate(b)).paired
    # another split of the same sentences: other units, not pairable
    moved = ConceptDataset(
        dataset.sentences, dataset.labels, ("test", *dataset.splits[1:]), "planted"
    )
    assert units_hash(moved, moved.indices("test")) != a["units_hash"]


def test_resampled_auroc_equals_auroc_matrix_on_each_resample():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, size=(30, 5)).astype(float)  # many ties
    scores[0, 0] = -np.inf  # a sentence without tokens
    positives = rng.integers(0, 3, size=30)[:, None] == np.arange(3)[None, :]
    pairs_f, pairs_c = np.array([0, 1, 2, 3, 4, 0]), np.array([0, 1, 2, 0, 1, 2])
    resampled = ResampledAuroc(scores[:, pairs_f], positives[:, pairs_c])
    for indices in [np.arange(30), *stats.resample_indices(30, 20, seed=3)]:
        expected = auroc_matrix(scores[indices], positives[indices])[pairs_c, pairs_f]
        np.testing.assert_allclose(resampled(indices), expected, atol=1e-12)
    batch = stats.resample_indices(30, 50, seed=4)  # a batch gives the same as one by one
    np.testing.assert_allclose(resampled(batch), np.stack([resampled(row) for row in batch]))
    no_positive = np.flatnonzero(~positives[:, 0])
    assert np.isnan(resampled(no_positive)[0])


def test_bad_encoder_names_are_refused():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="native"):
        ConceptDetection(encoders=["sparse"])
    with pytest.raises(ConfigError, match="each once"):
        ConceptDetection(encoders=["native", "native"])

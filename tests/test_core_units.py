"""Fast unit tests: hook names, tidy results, redaction, atomic writes, artifacts,
DiffMean's closed form and the AUROC used by concept detection."""

from __future__ import annotations

import json
import os
import stat
from itertools import product

import numpy as np
import pandas as pd
import pytest
import torch

from bench.core.hooks import HOOKS, hook_name, layer_of, parse_hook_name
from bench.core.secrets import REDACTED, is_secret_name, redact
from bench.core.storage import atomic_write, atomic_write_text
from bench.results import (
    SCHEMA,
    ResultsError,
    config_hash,
    finalize,
    read_metrics,
    write_metrics,
)
from bench.tasks.detection import auroc, auroc_matrix, best_feature_per_concept
from featbench.methods.base import ActivationSet, ArtifactError, Features
from featbench.methods.diffmean import DiffMean
from tests.conftest import RUN


def test_hook_names_are_canonical_and_checked():
    assert hook_name(12, "mlp_post") == "blocks.12.mlp.hook_post"
    assert hook_name(0, "mlp_out") == "blocks.0.hook_mlp_out"
    assert hook_name(5, "resid_post", n_layers=30) == "blocks.5.hook_resid_post"
    with pytest.raises(
        ValueError, match=r"layer=30 is outside the model: valid layers are 0\.\.29"
    ):
        hook_name(30, "mlp_post", n_layers=30)
    with pytest.raises(
        ValueError, match=r"hook='mlp_pre' is not a known hook; allowed: \['mlp_out'"
    ):
        hook_name(1, "mlp_pre")
    # the one parser: the inverse of hook_name for every hook it builds
    for short in HOOKS:
        assert layer_of(hook_name(17, short)) == 17
    assert parse_hook_name("blocks.3.ln2.hook_normalized") == (3, "ln2.hook_normalized")
    for bad in ("hook_embed", "blocks.x.hook_mlp_out", "blocks.3", "blocks.3."):
        with pytest.raises(ValueError, match="is not a block hook name"):
            parse_hook_name(bad)


def test_finalize_gives_the_design_schema_with_extras():
    rows = [
        {"feature": 0, "concept": "food", "metric": "auroc", "value": 0.9},
        {"metric": "s_cd", "feature": 1, "value": None, "reason": "undefined"},
        {"metric": "concept_coverage", "value": 0.5, "threshold": 0.9},
    ]
    frame = finalize(rows, RUN)
    assert list(frame.columns[: len(SCHEMA)]) == list(SCHEMA)
    assert {"reason", "threshold"} <= set(frame.columns)
    assert frame["feature"].isna().tolist() == [False, False, True]
    assert pd.isna(frame.loc[1, "value"]) and frame.loc[1, "reason"] == "undefined"
    assert (frame["layer"] == 3).all() and (frame["code_version"] == RUN["code_version"]).all()
    with pytest.raises(ValueError, match="run-level columns"):
        finalize([{"metric": "a", "value": 1.0, "model": "other"}], RUN)


def test_write_metrics_is_readable_with_versions(tmp_path):
    frame = finalize([{"metric": "a", "value": 1.0}], RUN)
    path = write_metrics(frame, tmp_path / "metrics.parquet", {"note": "x"})
    back, meta = read_metrics(path)
    assert back["value"].tolist() == [1.0]
    assert "torch" in meta["versions"] and meta["meta"] == {"note": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.parquet"]  # no temp files left


def test_failed_write_leaves_previous_file_untouched(tmp_path):
    target = tmp_path / "metrics.parquet"
    target.write_bytes(b"previous results")

    def broken_writer(tmp):
        tmp.write_bytes(b"half a fi")
        raise KeyboardInterrupt  # a job killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken_writer)
    assert target.read_bytes() == b"previous results"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.parquet"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_results_dir_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.parquet").write_bytes(b"old")
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ResultsError, match="cannot write results"):
            write_metrics(
                finalize([{"metric": "a", "value": 1.0}], RUN), tmp_path / "metrics.parquet"
            )
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    assert (tmp_path / "metrics.parquet").read_bytes() == b"old"


def test_results_error_when_target_is_unwritable(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ResultsError, match="cannot write results to .*not_a_dir"):
        write_metrics(finalize([{"metric": "a", "value": 1.0}], RUN), blocker / "metrics.parquet")
    assert blocker.read_text() == "a file where a folder should be"


def test_secret_names_and_redaction():
    for name in (
        "api_key",
        "key",
        "hf_token",
        "client_secret",
        "password",
        "apikey",
        "WANDB_API_KEY",
    ):
        assert is_secret_name(name), name
    for name in ("max_new_tokens", "tokenizer", "keyboard", "monkey_count", "batch_tokens"):
        assert not is_secret_name(name), name
    cfg = {"judge": {"api_key": "sk-123", "model": "gpt"}, "items": [{"token": "t"}], "seed": 1}
    assert redact(cfg) == {
        "judge": {"api_key": REDACTED, "model": "gpt"},
        "items": [{"token": REDACTED}],
        "seed": 1,
    }
    assert config_hash(cfg) == config_hash({**cfg, "judge": {"api_key": "other", "model": "gpt"}})
    assert config_hash(cfg) != config_hash({**cfg, "seed": 2})
    assert config_hash(cfg) == config_hash({**cfg, "paths": {"results_dir": "elsewhere"}})


def _acts(x, labels_per_sentence, tokens_per_sentence):
    sentence_ids = torch.arange(len(labels_per_sentence)).repeat_interleave(tokens_per_sentence)
    n = x.shape[0]
    return ActivationSet(
        x,
        torch.zeros(n, dtype=torch.long),
        sentence_ids,
        torch.ones(n, dtype=torch.long),
        "blocks.0.mlp.hook_post",
        list(labels_per_sentence),
    )


def test_diffmean_matches_closed_form():
    x = torch.tensor(
        [
            [1.0, 0.0, 2.0],
            [3.0, 1.0, 0.0],
            [0.0, 2.0, 1.0],
            [1.0, 1.0, 1.0],
            [2.0, 0.0, 0.0],
            [0.0, 0.0, 4.0],
        ]
    )
    acts = _acts(x, ["a", "b", "neutral"], 2)  # rows 0-1: a, 2-3: b, 4-5: neutral
    features = DiffMean().fit(acts)
    assert features.labels == ["a", "b"]
    expected_a = x[0:2].mean(0) - x[2:6].mean(0)
    expected_b = x[2:4].mean(0) - torch.cat([x[0:2], x[4:6]]).mean(0)
    torch.testing.assert_close(features.directions[0], expected_a / expected_a.norm())
    torch.testing.assert_close(features.directions[1], expected_b / expected_b.norm())


def test_features_round_trip_and_tampering(tmp_path):
    feats = Features(
        torch.randn(5, 7),
        method="demo",
        hook="blocks.1.hook_mlp_out",
        labels=list("abcde"),
        info={"loss": [3.0, 2.0]},
        extra={"bias": torch.randn(7)},
    )
    feats.save(tmp_path, provenance={"model": "m", "layer": 1, "dataset_hash": "d0"})
    back = Features.load(tmp_path)
    assert back.provenance == {"model": "m", "layer": 1, "dataset_hash": "d0"}
    assert torch.equal(back.directions, feats.directions) and torch.equal(
        back.extra["bias"], feats.extra["bias"]
    )
    assert (
        back.labels == feats.labels and back.info == {"loss": [3.0, 2.0]} and back.method == "demo"
    )
    x = torch.randn(4, 7)
    assert torch.equal(back.encode(x), feats.encode(x))

    meta_path, tensor_path = tmp_path / "features.json", tmp_path / "features.safetensors"
    original_meta, original_tensors = meta_path.read_text(), tensor_path.read_bytes()
    meta = json.loads(original_meta)
    cases = [
        (lambda: meta_path.write_text(original_meta[:40]), "not valid JSON"),
        (
            lambda: meta_path.write_text(json.dumps({**meta, "k": 6})),
            r"directions of shape \(5, 7\), JSON says \(6, 7\)",
        ),
        (
            lambda: meta_path.write_text(json.dumps({**meta, "class": "collections.OrderedDict"})),
            "is not a featbench Features class",
        ),
        (
            lambda: meta_path.write_text(json.dumps({**meta, "class": "os.system"})),
            "cannot be imported",
        ),
        (
            lambda: meta_path.write_text(json.dumps({**meta, "class": "nowhere.Thing"})),
            "cannot be imported",
        ),
        (
            lambda: tensor_path.write_bytes(original_tensors[: len(original_tensors) // 2]),
            "unreadable safetensors",
        ),
        (lambda: tensor_path.unlink(), "missing"),
    ]
    for tamper, message in cases:
        meta_path.write_text(original_meta)
        tensor_path.write_bytes(original_tensors)
        tamper()
        with pytest.raises(ArtifactError, match=message):
            Features.load(tmp_path)


def test_an_artifact_saved_before_the_package_rename_still_loads(tmp_path):
    """features.json written when methods/ installed as top-level `methods` names
    `methods.snmf.SNMFFeatures`; it resolves to `featbench.methods.snmf.SNMFFeatures`."""
    from featbench.methods.snmf import SNMFFeatures

    feats = SNMFFeatures(torch.rand(3, 4), method="snmf", hook="blocks.1.hook_mlp_out")
    feats.save(tmp_path)
    meta_path = tmp_path / "features.json"
    meta = json.loads(meta_path.read_text())
    assert meta["class"] == "featbench.methods.snmf.SNMFFeatures"
    meta_path.write_text(json.dumps({**meta, "class": "methods.snmf.SNMFFeatures"}))
    back = Features.load(tmp_path)
    assert type(back) is SNMFFeatures and torch.equal(back.directions, feats.directions)


def test_artifacts_saved_before_the_bench_fit_move_still_load(tmp_path):
    """Issue 25: Features moved to bench.fit.features; a features.json that names the old
    place (`featbench.methods.base.Features`) loads through the plugin API's re-export."""
    feats = Features(torch.randn(3, 4), method="m", hook="blocks.1.hook_mlp_out")
    feats.save(tmp_path)
    meta_path = tmp_path / "features.json"
    meta = json.loads(meta_path.read_text())
    assert meta["class"] == "bench.fit.features.Features"
    meta_path.write_text(json.dumps({**meta, "class": "featbench.methods.base.Features"}))
    back = Features.load(tmp_path)
    assert type(back) is Features and torch.equal(back.directions, feats.directions)


@pytest.mark.parametrize("tie", ["same tensor", "a view"])
def test_a_tied_decoder_saves_and_loads(tmp_path, tie):
    """Issue 25: an `extra` tensor sharing memory with `directions` (a tied decoder) made
    safetensors refuse the save ("Some tensors share memory")."""
    directions = torch.randn(4, 8)
    tied = directions if tie == "same tensor" else directions[:2]
    feats = Features(directions, method="m", hook="blocks.1.hook_mlp_out", extra={"W_dec": tied})
    feats.save(tmp_path)
    back = Features.load(tmp_path)
    assert torch.equal(back.directions, directions) and torch.equal(back.extra["W_dec"], tied)


def _brute_auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matrix_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(30, 3)).astype(float)  # many ties
    labels = rng.integers(0, 3, size=30)
    positives = labels[:, None] == np.arange(3)[None, :]
    auc = auroc_matrix(scores, positives)
    for c, f in product(range(3), range(3)):
        assert auc[c, f] == pytest.approx(_brute_auroc(scores[:, f], positives[:, c]))
    constant = auroc_matrix(np.ones((30, 1)), positives)
    assert np.allclose(constant, 0.5)
    # the one AUROC: the calibration's two-sample form is the same computation
    pos, neg = scores[positives[:, 1], 2], scores[~positives[:, 1], 2]
    assert auroc(pos, neg) == pytest.approx(auc[1, 2])


def test_concept_detection_and_steering_match_features_to_concepts_by_one_rule():
    """A supervised method's own direction for a concept, else the best train AUROC (NaN,
    a constant feature, as 0.5); `best_feature_per_concept` is the only place it lives."""
    train_auc = np.array([[0.6, np.nan, 0.9], [0.7, 0.4, 0.2], [np.nan, np.nan, 0.3]])
    concepts = ["a", "b", "c"]
    assert best_feature_per_concept(train_auc, concepts, None).tolist() == [2, 0, 0]
    assert best_feature_per_concept(train_auc, concepts, ["c", "a"]).tolist() == [1, 0, 0]


def test_atomic_writes_get_the_mode_an_ordinary_open_gives(tmp_path):
    ordinary = tmp_path / "ordinary"
    ordinary.write_text("x")
    written = atomic_write_text(tmp_path / "atomic", "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(ordinary.stat().st_mode)

"""The reconstruction task: FVU and splicing, checked at the two ends where the
answer is known (a perfect decoder changes nothing; a broken one costs)."""

from __future__ import annotations

import logging

import pytest
import torch

from bench import datasets
from bench.activations import extract
from featbench.methods.base import Features
from featbench.methods.diffmean import DiffMean
from featbench.methods.pca import PCA
from featbench.tasks.base import TaskData
from featbench.tasks.reconstruction import LOGIT_BUDGET, Reconstruction, logit_batch_tokens


class ZeroDecoder(Features):
    """Decodes everything to zero: the worst splice."""

    def decode(self, codes):
        return torch.zeros(codes.shape[0], self.d)


@pytest.fixture()
def setup(tiny_model, tmp_path):
    data = datasets.load(concepts=["food", "music", "french"], max_per_concept=8, max_neutral=6)
    acts = extract(tiny_model, data, 1, "mlp_post", model_fingerprint="tiny-recon", use_cache=False)
    return tiny_model, data, acts, TaskData(data, acts, 1, "mlp_post", 0, tmp_path)


def _metrics(rows):
    return {r["metric"]: r["value"] for r in rows}


def test_perfect_reconstruction_changes_nothing(setup):
    model, data, acts, task_data = setup
    full = PCA(n_features=acts.d).fit(acts.subset(data.indices("train")))  # complete basis: exact
    values = _metrics(Reconstruction().evaluate(model, full, task_data, None))
    assert values["fvu"] < 1e-6
    assert abs(values["kl_spliced"]) < 1e-5 and abs(values["ce_delta"]) < 1e-4
    assert values["ce_clean"] > 0


def test_broken_decoder_costs_and_partial_sits_between(setup):
    model, data, acts, task_data = setup
    train = acts.subset(data.indices("train"))
    zero = ZeroDecoder(torch.eye(acts.d)[:4], method="zero", hook=acts.hook)
    broken = _metrics(Reconstruction().evaluate(model, zero, task_data, None))
    partial = _metrics(
        Reconstruction().evaluate(model, PCA(n_features=8).fit(train), task_data, None)
    )
    assert broken["fvu"] > 0.99 and broken["kl_spliced"] > partial["kl_spliced"] > 1e-6
    assert 0 < partial["fvu"] < broken["fvu"]


def test_no_decoder_no_rows(setup, caplog):
    caplog.set_level(logging.INFO)
    model, data, acts, task_data = setup
    feats = DiffMean().fit(acts.subset(data.indices("train")))
    assert Reconstruction().evaluate(model, feats, task_data, None) == []
    assert "have no decoder" in caplog.text


def test_metrics_are_ratios_over_test_sentences_with_paired_intervals(setup):
    model, data, acts, task_data = setup
    train = acts.subset(data.indices("train"))
    rows = {
        name: {
            r["metric"]: r
            for r in Reconstruction(bootstrap=200).evaluate(model, m, task_data, None)
        }
        for name, m in (
            ("pca4", PCA(n_features=4).fit(train)),
            ("pca8", PCA(n_features=8).fit(train)),
        )
    }
    test = acts.subset(data.indices("test"))
    x = test.acts.float()
    pca = PCA(n_features=4).fit(train)
    x_hat = pca.decode(pca.encode(x))
    direct = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert rows["pca4"]["fvu"]["value"] == pytest.approx(direct, rel=1e-5)
    for metric in ("fvu", "kl_spliced", "ce_delta"):
        row = rows["pca4"][metric]
        assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
        assert row["n"] == len(data.indices("test")) and row["paired_over"] == "test sentence"
        assert len(row["replicates"]) == 200
        # Two methods on the same split are scored on the same units: pairable.
        assert row["units_hash"] == rows["pca8"][metric]["units_hash"]


def test_the_splice_batch_is_sized_by_the_vocabulary():
    """Gemma 3's 262,144-token vocabulary at the extraction's 4,096 tokens per batch needed
    26 GB of logits and the default comparison was killed for it: the batch is capped so
    its full-vocabulary tensors fit the budget, for every vocabulary."""
    for d_vocab in (49_152, 262_144):
        tokens = logit_batch_tokens(4096, d_vocab)
        assert tokens * d_vocab * 4 * 6 <= LOGIT_BUDGET < (tokens + 1) * d_vocab * 4 * 6
    assert logit_batch_tokens(4096, 262_144) == 341 and logit_batch_tokens(4096, 49_152) == 1820
    assert logit_batch_tokens(64, 49_152) == 64  # a smaller setting is kept
    assert logit_batch_tokens(4096, 10**12) == 1  # never zero

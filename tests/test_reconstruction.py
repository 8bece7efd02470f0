"""The reconstruction task: FVU and splicing, checked at the two ends where the
answer is known (a perfect decoder changes nothing; a broken one costs)."""

from __future__ import annotations

import logging

import pytest
import torch

from bench.activations.extraction import extract
from bench.data import datasets
from featbench.methods.base import Features
from featbench.methods.diffmean import DiffMean
from featbench.methods.pca import PCA
from featbench.tasks.base import TaskData
from featbench.tasks.reconstruction import (
    LOGIT_BUDGET,
    Reconstruction,
    logit_batch_tokens,
    token_errors,
)


class ZeroDecoder(Features):
    """Decodes everything to zero: the worst splice."""

    def decode(self, codes):
        return torch.zeros(codes.shape[0], self.d)


@pytest.fixture()
def setup(tiny_model, tmp_path):
    data = datasets.load(concepts=["food", "music", "french"], max_per_concept=8, max_neutral=6)
    acts = extract(tiny_model, data, 1, "mlp_post", model_fingerprint="tiny-recon", use_cache=False)
    return (
        tiny_model,
        data,
        acts,
        TaskData(dataset=data, activations=acts, seed=0, output_dir=tmp_path),
    )


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


def test_massive_tokens_carry_the_pooled_fvu_and_not_the_per_token_figure():
    """A planted case with a known answer: two tokens of norm M (at +M and -M, so the mean
    stays 0) reconstructed exactly, and n - 2 ordinary unit tokens reconstructed as zero.
    The pooled FVU is (n - 2) / (2 M^2 + n - 2), nearly 0: the massive tokens hold the
    variance. The per-token explained variance is 2 / n: every ordinary token is lost."""
    n, big = 12, 1000.0
    x = torch.zeros(n, 2, dtype=torch.float64)
    x[0, 0], x[1, 0] = big, -big
    x[2:, 1] = torch.tensor([1.0, -1.0] * ((n - 2) // 2))
    x_hat = torch.zeros_like(x)
    x_hat[:2] = x[:2]
    err, dev, explained = token_errors(x, x_hat)
    pooled = float(err.sum() / dev.sum())
    assert pooled == pytest.approx((n - 2) / (2 * big**2 + n - 2), rel=1e-9) and pooled < 1e-5
    assert float(explained.mean()) == pytest.approx(2 / n, rel=1e-9)
    assert explained.tolist() == [1.0, 1.0] + [0.0] * (n - 2)


@pytest.mark.integration
def test_an_exact_reconstruction_spliced_at_resid_post_costs_nothing(embedded, tmp_path):
    """At resid_post the embedded model's first real token carries activations of norm up to
    ~26,000: an exact reconstruction spliced there still changes no next-token
    distribution, and both variance figures say so."""
    model, data = embedded.model, datasets.load(max_per_concept=6, max_neutral=6)
    acts = extract(
        model, data, 12, "resid_post", model_fingerprint=embedded.fingerprint, use_cache=False
    )
    full = PCA(n_features=acts.d).fit(acts.subset(data.indices("train")))
    task_data = TaskData(dataset=data, activations=acts, seed=0, output_dir=tmp_path)
    values = _metrics(Reconstruction(bootstrap=20).evaluate(model, full, task_data, None))
    assert values["fvu"] < 1e-6 and values["explained_variance_per_token"] > 1 - 1e-4
    assert abs(values["kl_spliced"]) < 1e-4 and abs(values["ce_delta"]) < 1e-3

"""The reconstruction task: FVU and splicing, checked at the two ends where the
answer is known (a perfect decoder changes nothing; a broken one costs)."""

from __future__ import annotations

import logging

import pytest
import torch

from bench import datasets
from bench.activations import extract
from methods.base import Features
from methods.diffmean import DiffMean
from methods.pca import PCA
from tasks.base import TaskData
from tasks.reconstruction import Reconstruction


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

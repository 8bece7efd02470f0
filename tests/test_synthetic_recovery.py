"""Synthetic recovery task: planted features, controls, label-needing methods, determinism."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sae_lens.synthetic import mean_correlation_coefficient

import bench.config  # noqa: F401  (registers the featbench_schema the config composes on)
from bench.run import build
from tasks.base import Task
from tasks.synthetic_recovery import SyntheticRecovery, matched_cosines
from tests.conftest import REPO

SNMF = {"_target_": "methods.snmf.SNMF", "rank": 100, "sparsity": 0.01, "max_iter": 200,
        "patience": 50, "device": "cpu"}  # fmt: skip
PCA = {"_target_": "methods.pca.PCA", "n_features": 100}


def run(method: dict, **task) -> dict[tuple[str, float, str], dict]:
    """The task's rows keyed by (generator, noise, metric)."""
    cfg = OmegaConf.create({"seed": 0, "method": method})
    rows = SyntheticRecovery(**{"noise_levels": [0.0], "seed": 0, **task}).evaluate(
        None, None, None, cfg
    )
    return {(r["generator"], r["noise"], r["metric"]): r for r in rows}


def test_snmf_recovers_its_own_planted_features():
    rows = run(SNMF, generators=["snmf"], n_tokens=2000)
    assert rows["snmf", 0.0, "recovered_fraction"]["value"] >= 0.9
    assert rows["snmf", 0.0, "recovered_fraction"]["threshold"] == 0.9
    assert rows["snmf", 0.0, "mcc"]["value"] >= 0.9
    assert rows["snmf", 0.0, "mcc"]["n_learned"] == 20  # rank 100 was matched to k_true
    assert rows["snmf", 0.0, "mcc"]["adapted"] == '{"rank": 20, "sparsity": 0.05}'
    assert all(r.get("feature") is None and r.get("concept") is None for r in rows.values())


def test_random_control_recovers_nothing():
    # seed 0 is also the control's own seed: the data must not share its draws
    rows = run({"_target_": "methods.random.RandomDirections", "n_features": 100, "seed": 0},
               noise_levels=[0.0, 0.1])  # fmt: skip
    for generator in ("snmf", "sae_lens"):
        for noise in (0.0, 0.1):
            assert rows[generator, noise, "recovered_fraction"]["value"] == 0.0
            assert rows[generator, noise, "mcc"]["value"] < 0.2


def test_label_needing_method_gives_missing_values_with_a_reason():
    rows = run({"_target_": "methods.diffmean.DiffMean"}, noise_levels=[0.0, 0.1])
    assert len(rows) == 2 * 2 * 3  # generators x noise levels x metrics, none dropped
    for row in rows.values():
        assert row["value"] is None and "requires concept labels" in row["reason"]


@pytest.mark.parametrize("method", [SNMF, PCA], ids=["snmf", "pca"])
def test_sae_lens_generator_scores_in_unit_interval(method):
    rows = run(method, generators=["sae_lens"], n_tokens=2000)
    for metric in ("mcc", "recovered_fraction", "mcc_abs"):
        assert 0.0 <= rows["sae_lens", 0.0, metric]["value"] <= 1.0
    assert rows["sae_lens", 0.0, "mcc"]["n_learned"] == 20


def test_same_seed_same_rows_other_seed_other_data():
    task = SyntheticRecovery(n_tokens=1000, noise_levels=[0.0, 0.1], seed=3)
    cfg = OmegaConf.create({"seed": 3, "method": PCA})
    assert task.evaluate(None, None, None, cfg) == task.evaluate(None, None, None, cfg)
    for generator in ("snmf", "sae_lens"):
        x, truth = task.generate(generator)
        assert torch.equal(x, task.generate(generator)[0])
        assert not torch.equal(x, SyntheticRecovery(n_tokens=1000, seed=4).generate(generator)[0])
        torch.testing.assert_close(truth.norm(dim=1), torch.ones(20))


def test_matching_counts_missing_and_anti_aligned_features_as_zero():
    truth = torch.eye(4, 8)
    assert matched_cosines(truth, truth[:2]).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert matched_cosines(truth, -truth).tolist() == [0.0] * 4
    assert matched_cosines(truth, -truth, absolute=True).tolist() == [1.0] * 4
    learned = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    ours = matched_cosines(truth, learned, absolute=True).mean()
    assert ours == pytest.approx(mean_correlation_coefficient(learned, truth), abs=1e-6)


def test_yaml_composes_and_overrides_win():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["task=[synthetic_recovery]", "method=topk_sae", "seed=7",
                       "+task.synthetic_recovery.method_overrides.k=5"],
        )  # fmt: skip
    assert (
        (REPO / "conf/task/synthetic_recovery.yaml")
        .read_text()
        .startswith("# @package task.synthetic_recovery\n")
    )
    task = build(cfg.task.synthetic_recovery, "task", Task)
    assert task.seed == 7 and task.generators == ["snmf", "sae_lens"]
    resolved, changes = task.method_config(cfg.method, "sae_lens")
    assert changes == {"d_sae": 20, "k": 5} and resolved["seed"] == 7
    _, snmf_changes = SyntheticRecovery().method_config(OmegaConf.create(SNMF), "sae_lens")
    assert snmf_changes == {"rank": 20, "sparsity": 1.0}  # dense sae-lens directions
    with pytest.raises(ValueError, match="generators"):
        SyntheticRecovery(generators=["gpt"])

"""Synthetic recovery task: planted features, controls, label-needing methods, determinism,
and the capacity hook (`Method.at_capacity`) that gives every method the same information."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sae_lens.synthetic import mean_correlation_coefficient

from bench.errors import ConfigError
from bench.job.plugins import build
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method, NotResizable
from featbench.methods.sae_pretrained import SAEPretrained
from featbench.methods.snmf import SNMF as SNMFMethod
from featbench.methods.topk_sae import TopKSAE
from featbench.tasks.base import Task
from featbench.tasks.synthetic_recovery import (
    SyntheticRecovery,
    build_method,
    config_changes,
    matched_cosines,
)
from tests.conftest import REPO

SNMF = {
    "_target_": "featbench.methods.snmf.SNMF",
    "rank": 100,
    "sparsity": 0.01,
    "max_iter": 200,
    "patience": 50,
    "device": "cpu",
}
PCA = {"_target_": "featbench.methods.pca.PCA", "n_features": 100}
TOPK = {"_target_": "featbench.methods.topk_sae.TopKSAE", "d_sae": 100, "k": 16, "device": "cpu"}
RANDOM = {"_target_": "featbench.methods.random.RandomDirections", "n_features": 100, "seed": 0}
FULL = "capacity_and_sparsity"


@dataclass
class Oracle(Method):
    """Returns the planted directions themselves (regenerated from the task's settings)."""

    name: ClassVar[str] = "oracle"
    generator: str = "sae_lens"
    n_tokens: int = 2000
    seed: int = 0

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> Oracle:
        return replace(self)

    def fit(self, acts: ActivationSet) -> Features:
        task = SyntheticRecovery(n_tokens=self.n_tokens, seed=self.seed)
        clean, truth = task.generate(self.generator)
        assert acts.acts.shape == clean.shape  # the task's data, possibly with noise
        return Features(truth, method=self.name, hook=acts.hook)


@dataclass
class NoHook(Method):
    """A plugin that does not implement at_capacity."""

    def fit(self, acts: ActivationSet) -> Features:
        raise AssertionError("never fitted: it cannot be resized")


def run(method: dict, **task) -> dict[tuple[str, float, str], dict]:
    """The task's rows keyed by (generator, noise, metric)."""
    cfg = OmegaConf.create({"seed": 0, "method": method})
    rows = SyntheticRecovery(**{"noise_levels": [0.0], "seed": 0, **task}).evaluate(
        None, None, None, cfg
    )
    return {(r["generator"], r["noise"], r["metric"]): r for r in rows}


def test_snmf_recovers_its_own_planted_features():
    rows = run(SNMF, generators=["snmf"], n_tokens=2000, informed=FULL)
    assert rows["snmf", 0.0, "recovered_fraction"]["value"] >= 0.9
    assert rows["snmf", 0.0, "recovered_fraction"]["threshold"] == 0.9
    assert rows["snmf", 0.0, "mcc"]["value"] >= 0.9
    assert rows["snmf", 0.0, "mcc"]["n_learned"] == 20  # rank 100 was resized to k_true
    assert rows["snmf", 0.0, "mcc"]["adapted"] == '{"rank": 20, "sparsity": 0.05}'
    assert rows["snmf", 0.0, "mcc"]["informed"] == FULL
    assert all(r.get("feature") is None and r.get("concept") is None for r in rows.values())


def test_random_control_recovers_nothing():
    # seed 0 is also the control's own seed: the data must not share its draws
    rows = run(RANDOM, noise_levels=[0.0, 0.1])
    for generator in ("snmf", "sae_lens"):
        for noise in (0.0, 0.1):
            assert rows[generator, noise, "recovered_fraction"]["value"] == 0.0
            assert rows[generator, noise, "mcc"]["value"] < 0.2


def test_label_needing_method_gives_missing_values_with_a_reason():
    rows = run({"_target_": "featbench.methods.diffmean.DiffMean"}, noise_levels=[0.0, 0.1])
    assert len(rows) == 2 * 2 * 3  # generators x noise levels x metrics, none dropped
    for row in rows.values():
        assert row["value"] is None and "requires concept labels" in row["reason"]


def chance_mcc(k: int, d: int, draws: int = 200, absolute: bool = False) -> tuple[float, float]:
    """Mean and sd over draws of the matched cosine of k random unit directions with k
    independent random unit 'true' directions in d dimensions: what chance scores."""
    gen = torch.Generator().manual_seed(12345)
    values = [
        matched_cosines(
            torch.randn(k, d, generator=gen), torch.randn(k, d, generator=gen), absolute=absolute
        ).mean()
        for _ in range(draws)
    ]
    return float(np.mean(values)), float(np.std(values))


def test_sae_lens_generator_scores_in_unit_interval():
    # The oracle (the planted directions themselves) scores exactly 1 on every metric ...
    oracle = {"_target_": "tests.test_synthetic_recovery.Oracle", "n_tokens": 2000}
    rows = run(oracle, generators=["sae_lens"], n_tokens=2000, noise_levels=[0.0, 0.1])
    for noise in (0.0, 0.1):
        for metric in ("mcc", "recovered_fraction", "mcc_abs"):
            assert rows["sae_lens", noise, metric]["value"] == pytest.approx(1.0, abs=1e-6)
    oracle_hash = rows["sae_lens", 0.0, "mcc"]["units_hash"]
    assert oracle_hash != rows["sae_lens", 0.1, "mcc"]["units_hash"]  # other data: unpaired
    # ... and random directions score chance, well inside (0, 1): measured mcc 0.104 (chance
    # 0.104, sd 0.007 over draws) and mcc_abs 0.127 (chance 0.124, sd 0.006).
    rows = run(RANDOM, generators=["sae_lens"], n_tokens=2000)
    for metric, absolute in (("mcc", False), ("mcc_abs", True)):
        mean, sd = chance_mcc(20, 256, absolute=absolute)
        assert 0.05 < mean < 0.3
        assert abs(rows["sae_lens", 0.0, metric]["value"] - mean) < 4 * sd
    assert rows["sae_lens", 0.0, "recovered_fraction"]["value"] == 0.0
    assert rows["sae_lens", 0.0, "mcc"]["n_learned"] == 20
    # Every metric is a mean over the 20 true features with a bootstrap interval around it,
    # and the units hash pairs methods scored on the same planted data.
    for metric in ("mcc", "mcc_abs"):
        row = rows["sae_lens", 0.0, metric]
        assert row["n"] == 20 and row["paired_over"] == "true feature"
        assert row["ci_low"] < row["value"] < row["ci_high"] and len(row["replicates"]) == 1000
    assert rows["sae_lens", 0.0, "mcc"]["units_hash"] == oracle_hash


# Measured on clean sae_lens data (2000 tokens, 20 dense random directions in 256 dims, seed 0;
# chance ~0.10): PCA mcc_abs 0.716 (signed mcc 0.472: PCA's signs are arbitrary), TopK with
# capacity only (d_sae 20, k 4) mcc 0.660 (recovered 0.50; told ceil(3.0) = 3 active: 0.664),
# SNMF told the density (rank 20, sparsity 1.0) mcc 0.481 (with its own 1%: 0.200). Each bound
# is ~0.1 below the measured value and far above chance.
RECOVERY = [
    pytest.param(PCA, "capacity", "mcc_abs", 0.6, id="pca"),
    pytest.param(TOPK, "capacity", "mcc", 0.55, id="topk-capacity"),
    pytest.param(SNMF, FULL, "mcc", 0.4, id="snmf-informed"),
]


@pytest.mark.parametrize(("method", "informed", "metric", "bound"), RECOVERY)
def test_methods_given_the_true_capacity_recover_clean_data(method, informed, metric, bound):
    rows = run(method, generators=["sae_lens"], n_tokens=2000, informed=informed)
    assert rows["sae_lens", 0.0, metric]["value"] >= bound
    assert rows["sae_lens", 0.0, "mcc"]["n_learned"] == 20
    for metric in ("mcc", "recovered_fraction", "mcc_abs"):
        assert 0.0 <= rows["sae_lens", 0.0, metric]["value"] <= 1.0


def test_both_families_get_the_same_information(monkeypatch):
    received: dict[str, list] = {"snmf": [], "topk_sae": []}
    for cls in (SNMFMethod, TopKSAE):
        original = cls.at_capacity

        def record(self, k, generator=None, _original=original, _name=cls.name):
            received[_name].append((k, generator))
            return _original(self, k, generator)

        def fake_fit(self, acts):  # no training: this test is about what the methods are told
            return Features(
                torch.randn(20, acts.d, generator=torch.Generator().manual_seed(0)),
                method=self.name,
                hook=acts.hook,
            )

        monkeypatch.setattr(cls, "at_capacity", record)
        monkeypatch.setattr(cls, "fit", fake_fit)
    told = {
        "capacity": [(20, None), (20, None)],
        FULL: [(20, GeneratorInfo(0.05, 3.0)), (20, GeneratorInfo(1.0, 3.0))],
    }
    adapted = {
        ("snmf", "capacity"): [{"rank": 20}] * 2,
        ("topk_sae", "capacity"): [{"d_sae": 20, "k": 4}] * 2,  # 16 of 100 -> ceil(3.2) of 20
        ("snmf", FULL): [{"rank": 20, "sparsity": 0.05}, {"rank": 20, "sparsity": 1.0}],
        ("topk_sae", FULL): [{"d_sae": 20, "k": 3}] * 2,  # ceil(3.0) active per token
    }
    for informed, expected in told.items():
        for name, method in (("snmf", SNMF), ("topk_sae", TOPK)):
            received[name].clear()
            rows = run(method, informed=informed)  # both generators, through evaluate
            assert received[name] == expected
            got = [json.loads(rows[g, 0.0, "mcc"]["adapted"]) for g in ("snmf", "sae_lens")]
            assert got == adapted[name, informed]
        assert received["snmf"] == received["topk_sae"]


def test_capacity_only_never_reveals_the_generators_sparsity():
    topk, snmf = build_method(TOPK), build_method(SNMF)
    for generator in ("snmf", "sae_lens"):
        sparse, dense = (
            SyntheticRecovery(active_per_token=a, sparsity=p) for a, p in ((2.0, 0.02), (5.0, 0.2))
        )
        assert sparse.resize(topk, generator) == dense.resize(topk, generator)
        assert sparse.resize(snmf, generator) == dense.resize(snmf, generator)
        assert sparse.resize(snmf, generator).sparsity == 0.01  # SNMF's own default
        sparse.informed = dense.informed = FULL
        assert (sparse.resize(topk, generator).k, dense.resize(topk, generator).k) == (2, 5)
    assert topk.d_sae == 100 and topk.k == 16  # at_capacity returned new instances
    rank_alias = TopKSAE(rank=50, k=8, device="cpu").at_capacity(20)
    assert (rank_alias.rank, rank_alias.d_sae, rank_alias.k) == (20, 20, 4)


def test_methods_that_cannot_be_resized_give_missing_values_with_a_reason():
    rows = run({"_target_": "tests.test_synthetic_recovery.NoHook"}, generators=["snmf"])
    for row in rows.values():
        assert row["value"] is None and "does not say how it is resized" in row["reason"]
    pretrained = object.__new__(SAEPretrained)  # skips the checks for a real SAE folder
    with pytest.raises(NotResizable, match="trained weights"):
        pretrained.at_capacity(20)
    with pytest.raises(ConfigError, match="not fields"):
        SyntheticRecovery(method_overrides={"no_such_key": 1}).resize(build_method(SNMF), "snmf")
    with pytest.raises(ValueError, match="informed"):
        SyntheticRecovery(informed="everything")


def test_same_seed_same_rows_other_seed_other_data():
    task = SyntheticRecovery(n_tokens=1000, noise_levels=[0.0, 0.1], seed=3)
    cfg = OmegaConf.create({"seed": 3, "method": PCA})
    first, again = task.evaluate(None, None, None, cfg), task.evaluate(None, None, None, cfg)
    replicates = [
        (a.pop("replicates"), b.pop("replicates")) for a, b in zip(first, again, strict=True)
    ]
    assert first == again and all(np.array_equal(a, b) for a, b in replicates)
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
            overrides=[
                "task=[synthetic_recovery]",
                "method=topk_sae",
                "seed=7",
                "+task.synthetic_recovery.method_overrides.k=5",
            ],
        )
    assert (
        (REPO / "conf/task/synthetic_recovery.yaml")
        .read_text()
        .startswith("# @package task.synthetic_recovery\n")
    )
    task = build(cfg.task.synthetic_recovery, "task", Task)
    # the run's seed reaches the task at evaluate (TaskData.seed), the method via seeded()
    assert task.seed is None and task.generators == ["snmf", "sae_lens"]
    assert task.informed == "capacity"
    base = build_method(cfg.method).seeded(cfg.seed)
    resized = task.resize(base, "sae_lens")
    assert config_changes(base, resized) == {"d_sae": 20, "k": 5} and resized.seed == 7
    snmf = build_method(SNMF)
    informed = SyntheticRecovery(informed=FULL, method_overrides={"max_iter": 50})
    changes = config_changes(snmf, informed.resize(snmf, "sae_lens"))
    assert changes == {"rank": 20, "sparsity": 1.0, "max_iter": 50}  # dense sae-lens directions
    with pytest.raises(ValueError, match="generators"):
        SyntheticRecovery(generators=["gpt"])

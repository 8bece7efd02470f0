"""Methods: SNMF correctness on planted features, hierarchical SNMF, controls,
artifact round trips and the plugin path."""

from __future__ import annotations

import json
import math
import subprocess
import textwrap
from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from featbench.methods.base import ActivationSet, Features
from featbench.methods.diffmean import DiffMean
from featbench.methods.neurons import Neurons
from featbench.methods.pca import PCA
from featbench.methods.random import RandomDirections
from featbench.methods.snmf import EPS, SNMF, multiplicative_step, winner_take_all
from featbench.methods.snmf_hier import HierarchicalSNMF
from featbench.tasks.synthetic_recovery import planted_snmf
from tests.conftest import featbench_cmd


def planted(n=3000, d=200, k=10, p=0.05, active=0.2, seed=0, noise=0.0):
    """SNMF's generative story (the synthetic_recovery task's generator), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x, z = planted_snmf(n, d, k, p, active, gen)
    return x + noise * x.std() * torch.randn(x.shape, generator=gen), z


def as_acts(x, labels=None):
    n = x.shape[0]
    sentences = torch.arange(n) // 4
    return ActivationSet(
        x,
        torch.zeros(n, dtype=torch.long),
        sentences,
        torch.arange(n) % 4 + 1,
        "blocks.0.mlp.hook_post",
        labels,
    )


def matched_cosine(learned, true):
    cos = (
        torch.nn.functional.normalize(learned, dim=0).T @ torch.nn.functional.normalize(true, dim=0)
    ).numpy()
    rows, cols = linear_sum_assignment(-cos)
    return float(cos[rows, cols].mean())


def test_snmf_recovers_planted_features_at_zero_noise():
    x, z_true = planted()
    out = SNMF(rank=10, sparsity=0.05, max_iter=300, patience=50).factorize(x, progress=False)
    assert matched_cosine(out["Z"], z_true) >= 0.95
    nonzeros = (out["Z"] != 0).sum(dim=0)
    assert (nonzeros == math.ceil(0.05 * 200)).all(), nonzeros
    losses, scale = out["report"]["loss_curve"], float(x.double().pow(2).sum())
    assert max(b - a for a, b in pairwise(losses)) <= 1e-5 * scale  # never rises beyond float noise
    assert (out["G"] >= 0).all()


def test_snmf_same_seed_same_factors_and_other_inits():
    x, z_true = planted(n=1500)
    one = SNMF(rank=10, sparsity=0.05, max_iter=60).factorize(x, progress=False)
    two = SNMF(rank=10, sparsity=0.05, max_iter=60).factorize(x, progress=False)
    assert (
        torch.equal(one["Z"], two["Z"])
        and one["report"]["loss_curve"] == two["report"]["loss_curve"]
    )
    other = SNMF(rank=10, sparsity=0.05, max_iter=60, seed=7).factorize(x, progress=False)
    assert not torch.equal(one["Z"], other["Z"])
    for init in ("svd", "kmeans"):
        out = SNMF(rank=10, sparsity=0.05, max_iter=60, init=init).factorize(x, progress=False)
        assert out["report"]["relative_error"] < 1.0 and torch.isfinite(out["Z"]).all()


def test_snmf_trace_loss_equals_explicit_reconstruction():
    x, _ = planted(n=800, noise=0.1)
    for iters in (1, 3):  # the loss always improves early on, so the best iterate is the last
        out = SNMF(rank=8, sparsity=0.1, max_iter=iters).factorize(x, progress=False)
        assert out["report"]["best_iteration"] == iters - 1
        explicit = float((x.double() - out["G"].double() @ out["Z"].double().T).pow(2).sum())
        assert out["report"]["loss_curve"][-1] == pytest.approx(explicit, rel=1e-6)


def test_snmf_half_precision_storage_matches_float32():
    x, _ = planted(n=1000)
    a = SNMF(rank=10, sparsity=0.05, max_iter=40).factorize(x.half().float(), progress=False)
    b = SNMF(rank=10, sparsity=0.05, max_iter=40).factorize(x.half(), progress=False)
    torch.testing.assert_close(a["Z"], b["Z"])


def test_snmf_features_encode_and_decode():
    x, _ = planted(n=1200)
    feats = SNMF(rank=10, sparsity=0.05, max_iter=150).fit(as_acts(x))
    assert feats.directions.shape == (10, 200)
    torch.testing.assert_close(feats.directions.norm(dim=1), torch.ones(10))
    codes = feats.encode(x)
    assert (codes >= 0).all()
    fvu = float((x - feats.decode(codes)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.05
    feats.info["encode"] = "cosine"
    cosine = feats.encode(x)
    assert cosine.abs().max() <= 1.0 + 1e-5


def test_snmf_bad_settings():
    with pytest.raises(ValueError, match=r"method.sparsity=1.5: must be in \(0, 1\]"):
        SNMF(sparsity=1.5)
    with pytest.raises(ValueError, match=r"method.sparsity=0"):
        SNMF(sparsity=0)
    with pytest.raises(ValueError, match="method.init='pca'"):
        SNMF(init="pca")
    with pytest.raises(
        ValueError, match=r"method.rank=300 exceeds min\(tokens, width\) = min\(3000, 200\)"
    ):
        SNMF(rank=300).factorize(planted()[0], progress=False)


def test_snmf_update_sends_entries_below_the_smallest_normal_float_to_zero():
    """The step the CPU would take in flush-to-zero mode: an entry the rule shrinks into the
    subnormal range is 0 (no slow subnormal arithmetic afterwards), every other entry is the
    plain rule's value."""
    g = torch.tensor([[1e-36], [1.0], [1e-36], [0.0]])
    xz = torch.tensor([[1e-20], [2.0], [1e-6], [1.0]])
    ztz = torch.tensor([[1.0]])
    plain = g * torch.sqrt(xz / (g @ ztz + EPS))  # k = 1, Z^T Z > 0: the rule written out
    tiny = torch.finfo(torch.float32).tiny
    assert 0 < plain[0, 0] < tiny  # the case under test: the plain rule gives a subnormal
    out = multiplicative_step(g.clone(), xz, ztz)
    assert out[0, 0] == 0
    torch.testing.assert_close(out[1:], plain[1:], rtol=0, atol=0)
    assert out[2, 0] >= tiny  # 1e-36 grown by its factor stays: only subnormals are cut


def test_winner_take_all_keeps_largest_magnitudes():
    z = torch.tensor([[1.0, -5.0], [-3.0, 0.5], [2.0, 4.0], [0.1, -0.2]])
    kept = winner_take_all(z, 0.5)
    assert kept.tolist() == [[0.0, -5.0], [-3.0, 0.0], [2.0, 4.0], [0.0, 0.0]]


def test_hierarchical_levels_edges_and_tree(tmp_path):
    x, _ = planted(n=1500, k=12)
    method = HierarchicalSNMF(ranks=[12, 6, 3], sparsity=0.05, max_iter=80)
    feats = method.fit(as_acts(x))
    assert len(feats) == 21 and [lv["rank"] for lv in feats.info["levels"]] == [12, 6, 3]
    edges = feats.info["edges"]
    assert edges
    # Each level factorizes the one below: Z1 ~= Z2 Y2, with Y2 >= 0 pairing with Z2.
    z = method._snmf(6).factorize(feats.extra["Z"][:, :12].T, progress=False)
    z1, z2, y2 = feats.extra["Z"][:, :12], z["Z"], z["G"].T
    assert (y2 >= 0).all()
    assert float((z1 - z2 @ y2).norm() / z1.norm()) < 0.9
    # Edges follow the rule: child coefficient >= 0.15 x the parent's largest.
    level2 = HierarchicalSNMF(ranks=[12, 6], sparsity=0.05, max_iter=80).fit(as_acts(x))
    assert {(e["parent"], e["child"]) for e in level2.info["edges"]} <= {
        (12 + p, c) for p in range(6) for c in range(12)
    }
    assert feats.encode(x).shape == (1500, 21)
    feats.save(tmp_path)
    tree = json.loads((tmp_path / "tree.json").read_text())
    assert tree["edges"] == edges and (tmp_path / "tree.png").read_bytes()[:4] == b"\x89PNG"
    back = Features.load(tmp_path)
    assert torch.equal(back.encode(x[:50]), feats.encode(x[:50]))
    tuned = HierarchicalSNMF(ranks=[12, 6], sparsity=0.05, max_iter=40, finetune_iters=5).fit(
        as_acts(x)
    )
    assert torch.isfinite(tuned.directions).all() and tuned.info["finetune_iters"] == 5
    with pytest.raises(ValueError, match="strictly decreasing"):
        HierarchicalSNMF(ranks=[10, 20])


def test_controls():
    x = torch.randn(500, 40, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 2, 40)
    rnd = RandomDirections(n_features=7).fit(as_acts(x))
    assert rnd.directions.shape == (7, 40) and torch.equal(
        rnd.directions, RandomDirections(n_features=7).fit(as_acts(x)).directions
    )
    neu = Neurons(n_features=5).fit(as_acts(x))
    assert sorted(neu.info["neurons"]) == [35, 36, 37, 38, 39]
    assert torch.equal(neu.encode(x), x[:, neu.info["neurons"]])
    pca = PCA(n_features=40).fit(as_acts(x))
    torch.testing.assert_close(pca.decode(pca.encode(x)), x, atol=1e-3, rtol=1e-3)
    first = pca.directions[0]
    assert first.abs().argmax() == 39  # the highest-variance coordinate
    with pytest.raises(ValueError, match="must be in 1..40"):
        Neurons(n_features=41).fit(as_acts(x))


@pytest.mark.parametrize(
    "method",
    [
        SNMF(rank=6, sparsity=0.1, max_iter=30),
        RandomDirections(n_features=6),
        Neurons(n_features=6),
        PCA(n_features=6),
        DiffMean(),
    ],
    ids=lambda m: m.name,
)
def test_every_method_round_trips(tmp_path, method):
    x, _ = planted(n=400, d=60, k=6, p=0.1)
    labels = [["a", "b", "neutral"][i % 3] for i in range(100)]
    feats = method.fit(as_acts(x, labels))
    feats.save(tmp_path)
    back = Features.load(tmp_path)
    assert type(back) is type(feats) and back.method == feats.method
    assert torch.equal(back.directions, feats.directions)
    assert torch.equal(back.encode(x), feats.encode(x))


PLUGIN = textwrap.dedent(
    '''
    from dataclasses import dataclass
    import torch
    from featbench.methods.base import Features, Method

    @dataclass
    class FirstCoordinates(Method):
        """Toy plugin: the first k basis directions."""
        name = "first_coordinates"
        k: int = 3

        def fit(self, acts):
            return Features(torch.eye(acts.d)[: self.k], method=self.name, hook=acts.hook)
    '''
)


@pytest.mark.integration
def test_a_plugin_outside_the_repo_runs_end_to_end(tmp_path, embedded):
    """The researcher's package is called `methods`, as the repo's folder is: the built-in
    methods and tasks install as featbench.methods / featbench.tasks, so it shadows nothing
    (the smoke run's tasks import featbench.methods.base) and is itself found."""
    plugin_dir = tmp_path / "plugins"
    (plugin_dir / "methods").mkdir(parents=True)
    (plugin_dir / "methods" / "__init__.py").write_text(PLUGIN)
    (plugin_dir / "tasks").mkdir()
    (plugin_dir / "tasks" / "__init__.py").write_text("raise ImportError('shadowed tasks')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(plugin_dir)}
    args = [
        "experiment=smoke",
        "method._target_=methods.FirstCoordinates",
        "+method.k=4",
        f"paths.results_dir={tmp_path / 'res'}",
    ]
    out = subprocess.run(
        featbench_cmd() + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [metrics] = list((tmp_path / "res").rglob("metrics.parquet"))
    import pandas as pd

    frame = pd.read_parquet(metrics)
    assert set(frame["method"]) == {"first_coordinates"}
    assert frame[frame["metric"] == "auroc"]["feature"].nunique() == 4
    assert np.isfinite(frame[frame["metric"] == "mean_feature_auroc"]["value"]).all()


TASK_PLUGIN = textwrap.dedent(
    '''
    from dataclasses import dataclass
    from typing import ClassVar
    from featbench.tasks.base import Headline, Task

    @dataclass
    class DirectionNorms(Task):
        """Toy plugin task: the mean norm of the features' directions (one summary row)."""
        name: ClassVar[str] = "direction_norms"
        title: ClassVar[str] = "Direction norms (a plugin task)"
        headlines: ClassVar[tuple] = (Headline("mean_norm", higher_is_better=None),)
        compared: ClassVar[bool] = False  # one number per job: no units to pair on
        scale: float = 1.0

        def evaluate(self, model, features, data, cfg):
            norm = float(features.directions.norm(dim=1).mean()) * self.scale
            return [{"metric": "mean_norm", "value": norm},
                    {"metric": "not_a_headline", "value": 0.0}]
    '''
)


@pytest.mark.integration
def test_a_task_plugin_outside_the_repo_reaches_the_report(tmp_path, embedded):
    """A task is one class named by _target_; the report shows its declared title and
    headline from the job's metadata, with no file of bench/report touched."""
    plugin_dir = tmp_path / "plugins"
    (plugin_dir / "my_tasks").mkdir(parents=True)
    (plugin_dir / "my_tasks" / "__init__.py").write_text(TASK_PLUGIN)
    env = {**__import__("os").environ, "PYTHONPATH": str(plugin_dir)}
    args = [
        "experiment=smoke",
        "task=[concept_detection]",
        "logger=none",
        "+task.norms._target_=my_tasks.DirectionNorms",
        "+task.norms.scale=2.0",
        f"paths.results_dir={tmp_path / 'res'}",
    ]
    out = subprocess.run(
        featbench_cmd() + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [report] = list((tmp_path / "res").rglob("report.md"))
    text = report.read_text()
    assert "### Direction norms (a plugin task)" in text and "| setting | mean_norm |" in text
    assert "not_a_headline" not in text  # only the declared headlines are tabulated
    assert "| diffmean † | 2.00 |" in text  # DiffMean's unit directions, scaled by 2

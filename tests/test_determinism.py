"""Same config and seed on CPU gives bit-identical results (issue 7, determinism).

The end-to-end check runs `featbench experiment=smoke` twice, as two processes with
different string-hash seeds (so an order that depends on Python's set/dict hashing
shows up), and compares every value of `metrics.parquet` except `created_at`.

Per-method checks that already exist and are not repeated here:
test_methods.py::test_snmf_same_seed_same_factors_and_other_inits,
test_sae_methods.py::test_topk_sae_is_deterministic_given_the_seed,
test_synthetic_recovery.py::test_same_seed_same_rows_other_seed_other_data.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.results import read_metrics
from featbench.methods.diffmean import DiffMean
from featbench.methods.neurons import Neurons
from featbench.methods.pca import PCA
from featbench.methods.random import RandomDirections
from featbench.methods.snmf_hier import HierarchicalSNMF
from featbench.methods.topk_sae import TopKSAE
from tests.conftest import featbench_cmd
from tests.test_bad_input import _acts, _labels

VOLATILE = ["created_at"]  # wall-clock time of the run: the one column allowed to differ


def _start(job_dir: Path, hash_seed: str) -> subprocess.Popen:
    args = [
        "experiment=smoke",
        "device=cpu",
        "logger=none",
        "hydra.mode=RUN",
        f"hydra.run.dir={job_dir}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen(
        featbench_cmd() + args,
        cwd=job_dir.parent,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.integration
def test_two_smoke_runs_with_the_same_seed_are_bit_identical(tmp_path, embedded):
    # Both at once: the 2-core budget is shared, and the runs also share the activation cache.
    runs = {name: _start(tmp_path / name, seed) for name, seed in [("a", "1"), ("b", "2")]}
    for name, proc in runs.items():
        output, _ = proc.communicate(timeout=1200)
        assert proc.returncode == 0, (name, output[-3000:])
    (first, _), (second, _) = (read_metrics(tmp_path / n / "metrics.parquet") for n in runs)
    assert len(first) > 50 and set(first["task"]) >= {"concept_detection", "steering"}
    pd.testing.assert_frame_equal(
        first.drop(columns=VOLATILE), second.drop(columns=VOLATILE), check_exact=True
    )
    for artifact in ("features/features.safetensors", "features/contexts.json", "config.yaml"):
        assert (tmp_path / "a" / artifact).read_bytes() == (tmp_path / "b" / artifact).read_bytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda: HierarchicalSNMF(ranks=[6, 3], sparsity=0.2, max_iter=30, device="cpu"),
        lambda: TopKSAE(d_sae=8, k=2, epochs=2.0, batch_size=32, device="cpu"),
        lambda: PCA(n_features=4),
        lambda: Neurons(n_features=4),
        lambda: RandomDirections(n_features=4),
        lambda: DiffMean(),
    ],
    ids=["snmf_hier", "topk_sae", "pca", "neurons", "random", "diffmean"],
)
def test_every_method_is_bit_identical_on_refit(make):
    x = torch.randn(200, 24, generator=torch.Generator().manual_seed(3)).relu()
    acts = _acts(x, _labels(40))
    torch.manual_seed(123)  # global RNG state differs between the fits: it must not matter
    first = make().fit(acts)
    torch.manual_seed(456)
    second = make().fit(acts)
    assert torch.equal(first.directions, second.directions)
    assert torch.equal(first.encode(acts), second.encode(acts))

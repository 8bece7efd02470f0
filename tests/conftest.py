"""Shared fixtures.

Tiers (pytest markers, `--strict-markers`):
- unmarked: fast unit tests (tiny random models, small matrices);
- `integration`: real paths on an embedded model (SmolLM2-135M, Gemma 3 270M) with small inputs;
- `slow`: long runs, excluded only where CI time demands it.

The model and activation caches live in FEATBENCH_CACHE when it is set,
else in a per-session temporary folder (so a test run converts the GGUF model
once, about 25 s, and never touches the user's cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# One run's provenance, as bench.core.results.finalize stamps it on every row: the tests
# that write rows share it and override only the fields they check.
RUN = {
    "run_id": "r",
    "model": "m",
    "layer": 3,
    "hook": "blocks.3.mlp.hook_post",
    "method": "x",
    "task": "t",
    "seed": 42,
    "config_hash": "abc",
    "setting_hash": "def",
    "code_version": "featbench 0.1.0+gtest",
    "code_digest": "digest0",
    "dataset_hash": "d0",
    "dataset_version": "v0",
}


def pytest_configure(config):
    """Hydra's typed schema and featbench's folder-name resolvers, for the tests that compose
    the config (the command line registers them in bench.cli.featbench)."""
    from bench.cli.naming import register_resolvers
    from bench.job.config import register_schema

    register_schema()
    register_resolvers()


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    if not os.environ.get("FEATBENCH_CACHE"):
        os.environ["FEATBENCH_CACHE"] = str(tmp_path_factory.mktemp("featbench-cache"))
    yield Path(os.environ["FEATBENCH_CACHE"])


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (converted once per cache, then loaded warm)."""
    from bench.models import load_model

    return load_model("smollm2-135m", n_ctx=2048)


@pytest.fixture(scope="session")
def hf_reference():
    """The transformers model read from the same GGUF file."""
    from bench.models import load_hf_embedded

    return load_hf_embedded()


@pytest.fixture()
def tiny_model():
    """A randomly initialised 2-layer Llama-style HookedTransformer with the real
    SmolLM2 tokenizer: for shapes and bookkeeping only, never as evidence."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from bench.models import embedded_gguf_path

    tokenizer = _embedded_tokenizer(embedded_gguf_path())
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=48,
        d_vocab=tokenizer.vocab_size,
        n_ctx=128,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        final_rms=True,
        seed=0,
    )
    torch.manual_seed(0)
    return HookedTransformer(cfg, tokenizer).eval()


_TOKENIZER = {}


def _embedded_tokenizer(gguf: Path):
    if "tok" not in _TOKENIZER:
        from transformers import AutoTokenizer

        _TOKENIZER["tok"] = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _TOKENIZER["tok"]


def featbench_cmd() -> list[str]:
    """The installed console script (what a user runs)."""
    script = Path(sys.executable).parent / "featbench"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bench"]


def wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float) -> Path:
    """The first file under `root` matching `pattern`, waiting while `proc` (a sweep) runs.

    Fails naming the pattern if the sweep ends first or `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.rglob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(
                f"the sweep ended (rc={proc.returncode}) before {pattern} appeared"
            )
        time.sleep(0.2)
    raise AssertionError(f"{pattern} did not appear under {root} in {timeout} s")

"""The embedded model: logits equal transformers', the disk cache, local
checkpoints, and the offline failure for hub models."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from bench import models
from bench.models import ModelUnavailable, load_model

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "I think that",
    "def fibonacci(n):",
    "Der Hund läuft schnell über die Wiese",
]


def _ids(tokenizer, prompt):
    return torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]]
    )


def test_next_token_probabilities_match_transformers(embedded, hf_reference):
    hf_model, tokenizer = hf_reference
    worst = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = _ids(tokenizer, prompt)
            ours = embedded.model(ids).softmax(-1)
            theirs = hf_model(ids).logits.softmax(-1)
            worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 1e-4, worst


def test_greedy_continuation_knows_paris(embedded):
    text = embedded.model.generate(
        "The capital of France is", max_new_tokens=6, do_sample=False, verbose=False
    )
    assert "Paris" in text


def test_warm_load_comes_from_the_cache(embedded):
    again = load_model("smollm2-135m", "embedded", n_ctx=2048)
    assert again.cache_hit is True and again.fingerprint == embedded.fingerprint
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(again.model(ids), embedded.model(ids))


def test_stale_or_corrupt_cache_entries_are_never_used(embedded, _cache_dir):
    gguf = models.embedded_gguf_path()
    key = models._embedded_key(gguf, 2048)
    [entry] = [p for p in (_cache_dir / "models").iterdir() if p.is_dir() and
               json.loads((p / "meta.json").read_text())["key"] == key]  # fmt: skip
    assert models._read_converted(entry, key) is not None
    assert models._read_converted(entry, {**key, "conversion": -1}) is None  # stale
    weights = entry / "weights.safetensors"
    original = weights.read_bytes()
    try:
        corrupted = bytearray(original)
        corrupted[len(corrupted) // 2] ^= 0xFF
        weights.write_bytes(bytes(corrupted))
        assert models._read_converted(entry, key) is None  # checksum mismatch
        weights.write_bytes(original[: len(original) // 3])
        assert models._read_converted(entry, key) is None  # truncated
    finally:
        weights.write_bytes(original)
    assert models._read_converted(entry, key) is not None


def test_corrupt_entry_is_rebuilt_on_load(tmp_path, monkeypatch, embedded, _cache_dir):
    """A copy of the warm entry, corrupted, is rebuilt from the GGUF file (about 25 s)."""
    import shutil

    [entry] = [p for p in (_cache_dir / "models").glob("smollm2-135m-*") if p.is_dir()
               and json.loads((p / "meta.json").read_text())["key"]["n_ctx"] == 2048]  # fmt: skip
    copy = tmp_path / "models" / entry.name
    shutil.copytree(entry, copy)
    (copy / "weights.safetensors").write_bytes(b"garbage")
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path))
    rebuilt = load_model("smollm2-135m", "embedded", n_ctx=2048)
    assert rebuilt.cache_hit is False and rebuilt.fingerprint == embedded.fingerprint
    assert load_model("smollm2-135m", "embedded", n_ctx=2048).cache_hit is True


def test_local_checkpoint_directory(tmp_path, hf_reference, embedded):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_model, tokenizer = hf_reference
    # transformers will not save a GGUF-loaded model; rebuild it as a plain checkpoint.
    config = AutoConfig.for_model(**models._plain_hf_config(hf_model))
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(tmp_path / "llama-checkpoint")  # a path containing "llama" on purpose
    tokenizer.save_pretrained(tmp_path / "llama-checkpoint")
    local = load_model("hf_local", "local", path=str(tmp_path / "llama-checkpoint"), n_ctx=2048)
    ids = _ids(tokenizer, PROMPTS[0])
    with torch.no_grad():
        diff = (local.model(ids).softmax(-1) - embedded.model(ids).softmax(-1)).abs().max().item()
    assert diff <= 1e-4
    with pytest.raises(ModelUnavailable, match="not a Hugging Face checkpoint directory"):
        load_model("hf_local", "local", path=str(tmp_path / "nothing-here"))


def test_hub_model_offline_fails_fast_naming_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached
    code = (
        "import time, sys\n"
        "from bench.models import load_model, ModelUnavailable\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    load_model('gpt2-small', 'hub')\n"
        "except ModelUnavailable as err:\n"
        "    print(f'{time.perf_counter() - t:.2f}|{err}')\n"
    )
    for extra in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"} | extra
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert time.perf_counter() - start < 60, "offline failure must not hang on retries"
        seconds, message = out.stdout.strip().split("|", 1)
        assert "model=smollm2-135m" in message and "gpt2-small" in message, out.stdout + out.stderr
        assert float(seconds) < 10


def test_unknown_hub_name():
    with pytest.raises(ModelUnavailable, match="'not-a-model' is not a TransformerLens model name"):
        load_model("not-a-model", "hub")


def test_half_precision_model_loads_and_runs(embedded):
    half = load_model("smollm2-135m", "embedded", dtype="bfloat16", n_ctx=2048)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.fingerprint != embedded.fingerprint  # bf16 activations are cached apart
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        top = half.model(ids)[0, -1].float().argmax()
    assert half.model.tokenizer.decode([int(top)]).strip() == "Paris"

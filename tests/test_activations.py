"""Activation extraction bookkeeping on a tiny random model (shapes, alignment,
BOS/pad exclusion, caching) and once on the real embedded model."""

from __future__ import annotations

import pytest
import torch

from bench.activations import extraction as activations
from bench.activations.extraction import extract, tokenize
from bench.data import datasets
from bench.data.datasets import ConceptDataset


def _dataset(sentences, labels=None):
    labels = labels or ["a"] * len(sentences)
    return ConceptDataset(
        tuple(sentences), tuple(labels), tuple(["train"] * len(sentences)), "test"
    )


SENTENCES = [
    "Short one.",
    "A somewhat longer sentence with more tokens in it, clearly.",
    "Mid length sentence here.",
]


def _uncached(model, layer, hook, **kwargs):
    """Extract the test sentences without touching the cache."""
    return extract(
        model, _dataset(SENTENCES), layer, hook, model_fingerprint="tiny", use_cache=False, **kwargs
    )


def test_rows_align_with_tokens_and_match_single_sentence_runs(tiny_model):
    acts = _uncached(tiny_model, 1, "mlp_post", batch_tokens=64)
    token_ids, _ = tokenize(tiny_model, list(SENTENCES))
    assert acts.hook == "blocks.1.mlp.hook_post" and acts.d == tiny_model.cfg.d_mlp
    assert len(acts) == sum(len(t) - 1 for t in token_ids)  # BOS dropped, no pads
    for i, ids in enumerate(token_ids):
        rows = acts.sentence_ids == i
        assert acts.token_ids[rows].tolist() == ids[1:]
        assert acts.positions[rows].tolist() == list(range(1, len(ids)))
        _, cache = tiny_model.run_with_cache(torch.tensor([ids]), names_filter=acts.hook)
        torch.testing.assert_close(acts.acts[rows], cache[acts.hook][0, 1:], atol=1e-5, rtol=1e-5)


def test_batching_does_not_change_values(tiny_model):
    one = _uncached(tiny_model, 0, "resid_post", batch_tokens=1)
    big = _uncached(tiny_model, 0, "resid_post", batch_tokens=10_000)
    torch.testing.assert_close(one.acts, big.acts, atol=1e-5, rtol=1e-5)
    assert torch.equal(one.sentence_ids, big.sentence_ids)


def test_second_extraction_is_a_cache_hit_without_forward(tiny_model, monkeypatch):
    data = _dataset(SENTENCES)
    first = extract(tiny_model, data, 1, "mlp_out", model_fingerprint="tiny-cache-test")
    calls = []
    monkeypatch.setattr(tiny_model, "run_with_hooks", lambda *a, **k: calls.append(1))
    second = extract(tiny_model, data, 1, "mlp_out", model_fingerprint="tiny-cache-test")
    assert calls == [] and torch.equal(first.acts, second.acts)
    assert torch.equal(first.token_ids, second.token_ids)


def test_corrupt_cache_entry_is_rebuilt(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path))  # a cache of its own: one entry to corrupt
    data = _dataset(SENTENCES)
    first = extract(tiny_model, data, 0, "mlp_post", model_fingerprint="tiny-corrupt-test")
    [entry] = (tmp_path / "activations").glob("blocks.0.mlp.hook_post-*.safetensors")
    raw = bytearray(entry.read_bytes())
    raw[-8:] = b"\x00\x00\x80\x7f" * 2  # flip the last values to garbage
    entry.unlink()  # a new file: `first` may be memory-mapped from the old one
    entry.write_bytes(bytes(raw))
    assert activations._read_entry(entry, list(data.labels)) is None
    rebuilt = extract(tiny_model, data, 0, "mlp_post", model_fingerprint="tiny-corrupt-test")
    torch.testing.assert_close(rebuilt.acts, first.acts)
    assert activations._read_entry(entry, list(data.labels)) is not None


def test_layer_out_of_range_names_valid_range(tiny_model):
    with pytest.raises(ValueError, match=r"layer=2 is outside the model: valid layers are 0\.\.1"):
        _uncached(tiny_model, 2, "mlp_post")


def test_long_sentences_are_truncated_and_counted(tiny_model, caplog):
    long = " ".join(["word"] * 400)
    ids, settings = tokenize(tiny_model, [long, "short"], max_length=50)
    assert len(ids[0]) == 50 and settings["truncated"] == 1
    assert "1 of 2 sentences were longer than 50 tokens" in caplog.text


def test_non_finite_activation_names_hook_and_token(tiny_model):
    with torch.no_grad():
        tiny_model.blocks[0].mlp.W_in[:, 0] = float("nan")
    with pytest.raises(
        FloatingPointError,
        match=r"NaN/Inf activation at blocks.0.mlp.hook_post, sentence \d+, token position 1",
    ):
        _uncached(tiny_model, 0, "mlp_post")


@pytest.mark.integration
def test_embedded_extraction_of_the_shipped_data(embedded):
    data = datasets.load(concepts=["food", "german"], max_per_concept=6, max_neutral=4)
    acts = extract(embedded.model, data, 12, "mlp_post", model_fingerprint=embedded.fingerprint)
    assert acts.hook == "blocks.12.mlp.hook_post" and acts.d == 1536
    assert set(acts.sentence_ids.tolist()) == set(range(len(data)))
    assert torch.isfinite(acts.acts).all()
    bos = embedded.model.tokenizer.bos_token_id
    assert bos not in acts.token_ids.tolist()


def test_a_verified_entry_is_hashed_again_only_after_it_changes(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATBENCH_CACHE", str(tmp_path))
    data = _dataset(SENTENCES)
    extract(tiny_model, data, 0, "mlp_post", model_fingerprint="tiny-verified-test")
    [entry] = (tmp_path / "activations").glob("blocks.0.mlp.hook_post-*.safetensors")
    hashed = []
    digest = activations._digest
    monkeypatch.setattr(activations, "_digest", lambda t: hashed.append(1) or digest(t))
    assert activations._read_entry(entry, list(data.labels)) is not None
    assert hashed == []  # written and noted as verified: read without hashing
    raw = entry.read_bytes()
    entry.unlink()
    entry.write_bytes(raw)  # the same bytes in a new file: hashed once, then trusted again
    assert activations._read_entry(entry, list(data.labels)) is not None
    assert activations._read_entry(entry, list(data.labels)) is not None
    assert hashed == [1]

"""Gemma 3 270M, the second embedded model: loaded offline from its wheels, logits equal
to transformers', converted once and cached, and what steering at each hook means under
Gemma's extra norms.

The session's model is loaded (converted, the first time in a cache: about 100 s on 2
cores) with every socket connection refused and the hub switched off, and
`test_nothing_touched_the_network` checks that nothing tried.
"""

from __future__ import annotations

import json
import socket
from functools import cache
from pathlib import Path

import pytest
import torch

from bench import models
from bench.models import load_model
from bench.models.sources import embedded_model

pytestmark = pytest.mark.integration

NAME = "gemma3-270m"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Der Hund läuft schnell über die Wiese"]
LAYER = 7  # the YAML's default layer
_ATTEMPTS: list = []  # connections tried while the session's Gemma was loaded


@pytest.fixture(scope="session")
def gemma(_cache_dir):
    """The real Gemma 3 270M, loaded with the network refused (converted once per cache).
    Other test modules import this fixture; the model is loaded once per session."""
    return load_gemma()


@cache
def load_gemma():
    return _offline(lambda: load_model(NAME, n_ctx=2048))


@pytest.fixture(scope="session")
def gemma_hf(gemma):
    """transformers' Gemma3ForCausalLM read from the same (already assembled) GGUF file;
    the tokenizer is the converted model's (parsing the GGUF's again costs ~25 s)."""
    from transformers import AutoModelForCausalLM

    def read():
        gguf = models.embedded_gguf_path(NAME)
        return AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()

    return _offline(read), gemma.model.tokenizer


def _offline(load):
    """Run `load` with socket connections refused (and recorded) and the hub offline."""
    from huggingface_hub import constants

    def refuse(self, address, *args, **kwargs):
        _ATTEMPTS.append(address)
        raise OSError(f"test: network refused ({address})")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load()


def _ids(tokenizer, prompt):
    return torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]]
    )


def test_nothing_touched_the_network(gemma, gemma_hf):
    assert _ATTEMPTS == []


def test_architecture_is_gemma3_as_the_config_says(gemma):
    from omegaconf import OmegaConf

    cfg = gemma.model.cfg
    assert cfg.original_architecture == "Gemma3ForCausalLM"
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab) == (18, 640, 2048, 262_144)
    assert cfg.use_normalization_before_and_after and cfg.use_qk_norm
    assert cfg.attn_types.count("global") == 3 and cfg.window_size == 512
    yaml = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / f"{NAME}.yaml")
    assert yaml.n_layers == cfg.n_layers and yaml.default_layer == LAYER
    assert round(12 / 30 * cfg.n_layers) == LAYER  # SmolLM2's relative depth (12 of 30)
    assert embedded_model(NAME).tl_config == "google/gemma-3-270m"


def test_logits_match_transformers(gemma, gemma_hf):
    """Measured: logits within ~4e-5, probabilities within ~3e-6, same argmax."""
    hf_model, tokenizer = gemma_hf
    worst_logit = worst_prob = 0.0
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = _ids(tokenizer, prompt)
            ours, theirs = gemma.model(ids), hf_model(ids).logits
            worst_logit = max(worst_logit, (ours - theirs).abs().max().item())
            worst_prob = max(worst_prob, (ours.softmax(-1) - theirs.softmax(-1)).abs().max().item())
            assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), prompt
    assert worst_logit <= 2e-4 and worst_prob <= 1e-4, (worst_logit, worst_prob)


def test_tokenizer_prepends_bos_and_pads_right(gemma):
    tokens = gemma.model.to_tokens("hello world")
    assert tokens[0, 0].item() == gemma.model.tokenizer.bos_token_id == 2
    assert (tokens == 2).sum() == 1  # one BOS, not two
    assert gemma.model.tokenizer.padding_side == "right"
    # prompt_format: plain (a base model), and its tokenizer has no chat template
    assert embedded_model(NAME).prompt_format == "plain"
    assert not gemma.model.tokenizer.chat_template


def test_greedy_continuation_counts(gemma):
    text = gemma.model.generate("1, 2, 3, 4, 5,", max_new_tokens=6, do_sample=False, verbose=False)
    assert text.startswith("1, 2, 3, 4, 5, 6, 7"), text


def test_warm_load_comes_from_the_cache_and_the_gguf_is_assembled_once(gemma, _cache_dir):
    gguf = models.embedded_gguf_path(NAME)
    assert gguf.parent.parent == _cache_dir / "gguf"
    assert gguf.parent.name == embedded_model(NAME).gguf.sha256[:16]
    stamp = gguf.stat().st_mtime_ns
    again = load_model(NAME, n_ctx=2048)
    assert again.cache_hit is True and again.fingerprint == gemma.fingerprint
    assert models.embedded_gguf_path(NAME).stat().st_mtime_ns == stamp  # not written again
    ids = _ids(gemma.model.tokenizer, PROMPTS[0])
    with torch.no_grad():
        assert torch.equal(again.model(ids), gemma.model(ids))
    [entry] = [
        p
        for p in (_cache_dir / "models").glob(f"{NAME}-*")
        if p.is_dir() and json.loads((p / "meta.json").read_text())["key"]["n_ctx"] == 2048
    ]
    key = json.loads((entry / "meta.json").read_text())["key"]
    assert key["gguf_sha256"] == embedded_model(NAME).gguf.sha256
    assert key["tl_config"] == "google/gemma-3-270m"


# --- what steering at each hook means on Gemma --------------------------------------------


def _run(model, ids, hooks):
    """The activations at layer LAYER's hooks, with `hooks` (name, fn) added."""
    names = [f"blocks.{LAYER}.{p}" for p in ("mlp.hook_post", "hook_mlp_out", "hook_resid_post")]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(ids, names_filter=names)
    return [cache[n] for n in names]


def test_a_vector_added_at_hook_mlp_out_is_exactly_what_the_residual_stream_gains(gemma):
    model = gemma.model
    ids = _ids(model.tokenizer, PROMPTS[0])
    torch.manual_seed(0)
    v = torch.randn(model.cfg.d_model) * 20
    _, _, resid = _run(model, ids, [])
    _, _, steered = _run(model, ids, [(f"blocks.{LAYER}.hook_mlp_out", lambda a, hook: a + v)])
    assert (steered - resid - v).abs().max() < 1e-4 * v.abs().max()


def test_a_vector_added_at_mlp_post_passes_through_w_out_and_the_post_norm(gemma):
    """hook_mlp_out changes by ln2_post(b_out + W_out(post + z)) - ln2_post(b_out + W_out post),
    not by W_out z: the post-feedforward norm rescales the MLP's whole output."""
    model = gemma.model
    block = model.blocks[LAYER]
    ids = _ids(model.tokenizer, PROMPTS[0])
    torch.manual_seed(0)
    z = torch.randn(model.cfg.d_mlp) * 5
    post, out, resid = _run(model, ids, [])
    _, out_z, resid_z = _run(model, ids, [(f"blocks.{LAYER}.mlp.hook_post", lambda a, hook: a + z)])
    with torch.no_grad():
        before = block.ln2_post(post @ block.mlp.W_out + block.mlp.b_out)
        after = block.ln2_post((post + z) @ block.mlp.W_out + block.mlp.b_out)
        naive = z @ block.mlp.W_out
    assert (before - out).abs().max() < 1e-4 * out.abs().max()  # the hook is after ln2_post
    change = out_z - out
    assert (change - (after - before)).abs().max() < 1e-4 * change.abs().max()
    assert (resid_z - resid - change).abs().max() < 1e-4 * change.abs().max()
    # W_out z alone is far off: per token the norm's scale differs (and undoes most of it)
    assert (change - naive).norm() > 0.5 * naive.norm()


def test_steering_at_mlp_post_saturates_under_the_post_norm(gemma):
    """However large z, the MLP's output keeps the norm ln2_post's weights allow:
    |hook_mlp_out| <= sqrt(d_model) * max|ln2_post.w| at every token."""
    model = gemma.model
    block = model.blocks[LAYER]
    ids = _ids(model.tokenizer, PROMPTS[0])
    torch.manual_seed(0)
    z = torch.randn(model.cfg.d_mlp)
    bound = model.cfg.d_model**0.5 * block.ln2_post.w.abs().max().item()
    for scale in (1.0, 100.0, 10_000.0):
        hook = (f"blocks.{LAYER}.mlp.hook_post", lambda a, hook, s=scale: a + s * z)
        _, out, _ = _run(model, ids, [hook])
        assert out.norm(dim=-1).max() <= bound * (1 + 1e-4)

"""The lean decoder against TransformerLens's own forward pass with the same hooks.

Unit tests on tiny random models check the bookkeeping (hook points, errors) and each
piece of Gemma 3's architecture (post-norms, QK-norm, sliding-window layers with their
own rotary bases, a prompt longer than the window); the integration tests check the
logits of every decode step on the real embedded models, SmolLM2 and Gemma 3.
"""

from __future__ import annotations

import pytest
import torch

from bench.tasks.steering.decode import LeanDecoder, unsupported
from bench.tasks.steering.kl import steer_hook as _steer
from tests.test_gemma import load_gemma


@torch.no_grad()
def _reference_steps(model, tokens, hooks, steps):
    """Logits of TransformerLens's full forward at each step (no cache), greedy tokens."""
    seq, out = tokens, []
    for _ in range(steps):
        with model.hooks(fwd_hooks=hooks):
            logits = model(seq)[:, -1].float()
        out.append(logits)
        seq = torch.cat([seq, logits.argmax(-1)[:, None]], dim=1)
    return out, seq[:, tokens.shape[1] :]


def _lean_steps(model, tokens, hooks, chosen):
    decoder = LeanDecoder(model)
    out = [decoder.prefill(tokens, hooks, chosen.shape[1]).float()]
    for step in range(chosen.shape[1] - 1):
        out.append(decoder.step(chosen[:, step], hooks).float())
    return out


@pytest.fixture()
def tiny_gemma(tiny_model):
    """A randomly initialised 3-layer Gemma-3-style HookedTransformer: norms before and
    after attention and the MLP, QK-norm, grouped-query attention with one KV head, a
    global layer between two sliding-window layers (window 4) with their own rotary
    bases, gelu_pytorch_tanh gated MLP. Norm weights are random too (not all ones), so
    a norm applied in the wrong place or with the wrong weight shows."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_key_value_heads=1,
        d_mlp=48,
        d_vocab=tiny_model.cfg.d_vocab,
        n_ctx=64,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=1_000_000,
        rotary_base_local=10_000,
        gated_mlp=True,
        final_rms=True,
        eps=1e-6,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        use_local_attn=True,
        attn_types=["local", "global", "local"],
        window_size=4,
        use_attn_scale=True,
        attn_scale=8**0.5,
        original_architecture="Gemma3ForCausalLM",
        seed=0,
    )
    torch.manual_seed(0)
    model = HookedTransformer(cfg, tiny_model.tokenizer).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w"):  # ln1, ln1_post, ln2, ln2_post, q_norm, k_norm, ln_final
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model


def test_tiny_gemma_is_supported_and_uses_each_piece(tiny_gemma):
    assert unsupported(tiny_gemma) is None
    decoder = LeanDecoder(tiny_gemma)
    assert [layer["window"] for layer in decoder.layers] == [4, None, 4]
    assert all(
        layer["ln1_post"] is not None and layer["q_norm"] is not None for layer in decoder.layers
    )
    local, global_ = tiny_gemma.blocks[0].attn, tiny_gemma.blocks[1].attn
    assert not torch.equal(local.rotary_cos, global_.rotary_cos)  # two rotary bases


@pytest.mark.parametrize("prompt", ["I think that", "one two three four five six seven eight"])
@pytest.mark.parametrize(
    "point", ["mlp.hook_post", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
)
def test_tiny_gemma_matches_transformer_lens_at_every_step(tiny_gemma, point, prompt):
    """Short and longer-than-the-window prompts; 8 steps run past the window of 4 either way."""
    torch.manual_seed(0)
    width = tiny_gemma.cfg.d_mlp if point == "mlp.hook_post" else tiny_gemma.cfg.d_model
    hooks = [
        (f"blocks.0.{point}", _steer(torch.randn(3, width))),
        (f"blocks.1.{point}", _steer(torch.randn(3, width))),
    ]
    tokens = tiny_gemma.to_tokens(prompt).expand(3, -1)
    assert prompt.startswith("I") or tokens.shape[1] > tiny_gemma.cfg.window_size
    reference, chosen = _reference_steps(tiny_gemma, tokens, hooks, 8)
    lean = _lean_steps(tiny_gemma, tokens, hooks, chosen)
    for step, (a, b) in enumerate(zip(reference, lean, strict=True)):
        assert (a - b).abs().max() < 1e-4, (point, step)


@pytest.mark.parametrize("point", ["mlp.hook_post", "hook_mlp_out", "hook_resid_post"])
def test_tiny_model_matches_transformer_lens_at_every_step(tiny_model, point):
    torch.manual_seed(0)
    width = tiny_model.cfg.d_mlp if point == "mlp.hook_post" else tiny_model.cfg.d_model
    hooks = [(f"blocks.1.{point}", _steer(torch.randn(3, width)))]
    tokens = tiny_model.to_tokens("I think that").expand(3, -1)
    reference, chosen = _reference_steps(tiny_model, tokens, hooks, 6)
    lean = _lean_steps(tiny_model, tokens, hooks, chosen)
    for step, (a, b) in enumerate(zip(reference, lean, strict=True)):
        assert (a - b).abs().max() < 1e-4, (point, step)


def test_unknown_hook_point_is_refused(tiny_model):
    decoder = LeanDecoder(tiny_model)
    tokens = tiny_model.to_tokens("hello")
    with pytest.raises(ValueError, match=r"hook 'blocks.1.attn.hook_z' is not one of"):
        decoder.prefill(tokens, [("blocks.1.attn.hook_z", _steer(torch.zeros(1, 8)))], 2)
    with pytest.raises(ValueError, match=r"hook 'blocks.7.hook_mlp_out' is not one of"):
        decoder.prefill(tokens, [("blocks.7.hook_mlp_out", _steer(torch.zeros(1, 32)))], 2)


def test_unsupported_architectures_say_why(tiny_model):
    assert unsupported(tiny_model) is None
    tiny_model.cfg.attn_scores_soft_cap = 50.0
    try:
        reason = unsupported(tiny_model)
        assert reason is not None and "attn_scores_soft_cap" in reason
        with pytest.raises(ValueError, match="attn_scores_soft_cap"):
            LeanDecoder(tiny_model)
    finally:
        tiny_model.cfg.attn_scores_soft_cap = -1.0


@pytest.mark.integration
def test_embedded_model_logits_match_at_every_decode_step(embedded):
    """SmolLM2-135M, a steering vector per row at layer 12, 12 greedy steps: every step's
    logits within 1e-4 of TransformerLens's full forward with the same hook."""
    model = embedded.model
    torch.manual_seed(1)
    for point, width in (("mlp.hook_post", model.cfg.d_mlp), ("hook_mlp_out", model.cfg.d_model)):
        hooks = [(f"blocks.12.{point}", _steer(torch.randn(4, width) * 4))]
        tokens = model.to_tokens("I think that").expand(4, -1)
        reference, chosen = _reference_steps(model, tokens, hooks, 12)
        lean = _lean_steps(model, tokens, hooks, chosen)
        worst = max(float((a - b).abs().max()) for a, b in zip(reference, lean, strict=True))
        assert worst < 1e-4, (point, worst)


@pytest.fixture(scope="session")
def gemma(_cache_dir):
    return load_gemma()  # tests/test_gemma.py's, loaded once per session, network refused


@pytest.mark.integration
def test_gemma_logits_match_at_every_decode_step(gemma):
    """Gemma 3 270M, a steering vector per row (2 rows) at its default layer 7, 8 greedy steps:
    every step's logits within 1e-4 of TransformerLens's full forward with the same hook
    (measured: about 3e-5 at each of these hooks)."""
    model = gemma.model
    assert unsupported(model) is None
    torch.manual_seed(1)
    for point, width in (("mlp.hook_post", model.cfg.d_mlp), ("hook_mlp_out", model.cfg.d_model)):
        hooks = [(f"blocks.7.{point}", _steer(torch.randn(2, width) * 4))]
        tokens = model.to_tokens("I think that").expand(2, -1)
        reference, chosen = _reference_steps(model, tokens, hooks, 8)
        lean = _lean_steps(model, tokens, hooks, chosen)
        worst = max(float((a - b).abs().max()) for a, b in zip(reference, lean, strict=True))
        assert worst < 1e-4, (point, worst)

"""The lean decoder against TransformerLens's own forward pass with the same hooks.

Unit tests on a tiny random model check the bookkeeping (hook points, errors); the
integration test checks the logits of every decode step on the real embedded model.
"""

from __future__ import annotations

import pytest
import torch

from bench.decode import LeanDecoder, unsupported
from bench.steer import _steer


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

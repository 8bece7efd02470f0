"""Steering's measure: add vectors at a hook, at every position, and read the next-token
distribution after the prompt; `next_token_kl` is KL(P_base || P_steered) per vector, what
the alpha searches (`calibrate`) aim at a target."""

from __future__ import annotations

from typing import Any

import torch


def steer_hook(vectors: torch.Tensor):
    def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + vectors[:, None, :].to(act.dtype)

    return hook_fn


@torch.no_grad()
def unsteered(
    model, hook: str, prompts: list[str]
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per prompt, one plain forward pass: its tokens, the next-token log-probabilities
    after it, and the mean activation norm at the hook (BOS excluded)."""
    out = []
    for prompt in prompts:
        tokens = model.to_tokens(prompt)
        logits, cache = model.run_with_cache(tokens, names_filter=hook)
        norm = cache[hook][0, 1:].float().norm(dim=-1).mean().item()
        out.append((tokens, torch.log_softmax(logits[0, -1].float(), -1), norm))
    return out


@torch.no_grad()
def next_token_kl(
    model, hook: str, prompts: list[str], vectors: torch.Tensor, batch: int, base=None
):
    """Mean over prompts of KL(P_base || P_steered) at the last prompt position, one
    value per row of `vectors`; also the number of steered forward passes spent.
    `base` is `unsteered(model, hook, prompts)`, computed here when not given."""
    base = unsteered(model, hook, prompts) if base is None else base
    total, passes = torch.zeros(len(vectors)), 0
    for tokens, base_logp, _ in base:
        for i in range(0, len(vectors), batch):
            chunk = vectors[i : i + batch].to(tokens.device)
            with model.hooks(fwd_hooks=[(hook, steer_hook(chunk))]):
                logits = model(tokens.expand(len(chunk), -1))[:, -1].float()
            passes += 1
            steered = torch.log_softmax(logits, -1)
            total[i : i + len(chunk)] += (base_logp.exp() * (base_logp - steered)).sum(-1).cpu()
    return (total / len(base)).numpy(), passes

"""Next-token sampling for steered generation: the settings, the distribution, the draw.

Two samplers, chosen by `top_p`:

- `top_p` a float (featbench's default, 0.3): the `top_k` most likely tokens, then the
  smallest prefix of them whose probability reaches `top_p` (a nucleus inside the top k);
- `top_p` None (the SNMF paper's effective sampler): TransformerLens's `sample_logits`
  with `top_k` given. The logits are divided by the temperature, every logit below the
  k-th largest is masked (ties at the k-th value are kept), and the rest are sampled
  from a categorical distribution. The reference code passes `top_p=0.3` too, but
  `sample_logits` applies top-p only when top-k is None, so its nucleus never acts.

Either way the draw is an inverse-CDF lookup with a uniform number the caller supplies
(one per row and step, from the row's own seed), so a row's text does not depend on
which rows share its batch; the distribution sampled is the one above.
`next_token_probs` exposes that distribution (tests compare it with TransformerLens's).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class SamplingSettings(Protocol):
    """What sampling reads (the steering task has these fields)."""

    temperature: float  # 0 = greedy
    top_k: int  # tokens kept before any nucleus
    top_p: float | None  # nucleus inside the top k; None = top-k only (TransformerLens's rule)


def next_token_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """rows x vocab probabilities (float64) that `sample_next` draws from (temperature > 0)."""
    scaled = logits.double() / settings.temperature
    k = min(settings.top_k, scaled.shape[-1])
    kth = scaled.topk(k, dim=-1).values[:, -1:]
    if settings.top_p is None:  # TransformerLens: mask below the k-th value, ties kept
        return torch.softmax(scaled.masked_fill(scaled < kth, -torch.inf), -1)
    values, index = scaled.topk(k, dim=-1)
    probs = torch.softmax(values, -1)
    keep = (probs.cumsum(-1) - probs) < settings.top_p  # the smallest prefix reaching top_p
    probs = probs * keep
    out = torch.zeros_like(scaled)
    return out.scatter_(1, index, probs / probs.sum(-1, keepdim=True))


def sample_next(logits: torch.Tensor, u: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else the inverse CDF of
    `next_token_probs` at the row's uniform `u` (float64, in [0, 1))."""
    if settings.temperature == 0:
        return logits.argmax(-1)
    if settings.top_p is None:
        probs = next_token_probs(logits, settings)
        index = None
    else:  # only the top k can be drawn: a CDF over k entries, not the vocabulary
        values, index = (logits.double() / settings.temperature).topk(
            min(settings.top_k, logits.shape[-1]), dim=-1
        )
        probs = torch.softmax(values, -1)
        probs = probs * ((probs.cumsum(-1) - probs) < settings.top_p)
    cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1)
    pick = torch.searchsorted(cdf, u[:, None].to(cdf.dtype).contiguous(), right=True)
    pick = pick.clamp(max=probs.shape[-1] - 1)
    # a uniform just below 1 can land past the last kept entry by rounding: take the last kept one
    kept = probs > 0
    last = probs.shape[-1] - 1 - kept.flip(-1).int().argmax(-1, keepdim=True)
    pick = torch.minimum(pick, last)
    return (pick if index is None else index.gather(1, pick))[:, 0]


def uniforms(key: tuple, n: int) -> torch.Tensor:
    """n uniform numbers in [0, 1) (float64) from a seed key: the random numbers of one row."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

"""Steering mechanics: add vectors at a hook, measure the next-token KL, search
alpha for KL targets in batched passes, and sample continuations with a KV cache.

`tasks/steering.py` runs the protocol with these; `benchmarks/steering.py`
measures them against sequential bisection and single-sequence generation.
The `task` arguments are any object with the steering task's fields
(`prompts`, `kl_targets`, `tolerance`, `search_points`, `search_rounds`,
`batch_size`, `max_new_tokens`, `top_k`, `top_p`, `temperature`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.decode import LeanDecoder, unsupported

log = logging.getLogger(__name__)

ENGINES = ("lean", "reference")  # generation paths: bench.decode, or TransformerLens's forward


def _steer(vectors: torch.Tensor):
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
            with model.hooks(fwd_hooks=[(hook, _steer(chunk))]):
                logits = model(tokens.expand(len(chunk), -1))[:, -1].float()
            passes += 1
            steered = torch.log_softmax(logits, -1)
            total[i : i + len(chunk)] += (base_logp.exp() * (base_logp - steered)).sum(-1).cpu()
    return (total / len(base)).numpy(), passes


def search_alpha(model, hook: str, direction: torch.Tensor, task: Any, signs=(1, -1)):
    """For each (target index, sign in `signs`): (alpha, achieved KL, reason if not found).

    Round 0 evaluates a geometric grid of magnitudes (relative to the typical
    activation norm at the hook) for every sign in one batched pass. Each later
    round puts `search_points` candidates inside the brackets of the targets
    not yet within tolerance, again in one pass, so every round shrinks every
    bracket about tenfold. Returns the results and the forward passes spent.
    """
    base = unsteered(model, hook, task.prompts)  # once per search, not once per round
    scale = float(np.mean([norm for _, _, norm in base])) or 1.0
    targets = np.asarray(task.kl_targets, dtype=float)
    seen = {sign: [(0.0, 0.0)] for sign in signs}  # sign -> [(magnitude, kl)]
    passes = 0

    def evaluate(cands: list[tuple[int, float]]) -> None:
        nonlocal passes
        vecs = torch.stack([sign * m * direction for sign, m in cands])
        kls, n = next_token_kl(
            model, hook, task.prompts, vecs, max(task.batch_size, len(cands)), base
        )
        passes += n
        for (sign, m), kl in zip(cands, kls.tolist(), strict=True):
            seen[sign].append((m, kl))

    grid = scale * np.logspace(-2, 2, task.search_points // 2)
    evaluate([(sign, float(m)) for sign in signs for m in grid])
    found: dict[tuple[int, int], tuple[float | None, float | None, str | None]] = {}
    for _ in range(task.search_rounds + 1):
        brackets = []
        for sign in signs:
            pts = sorted(seen[sign])
            for t, target in enumerate(targets):
                if (t, sign) in found:
                    continue
                m_best, kl_best = min(pts, key=lambda p: abs(p[1] - target))
                if abs(kl_best - target) <= task.tolerance:
                    found[(t, sign)] = (sign * m_best, kl_best, None)
                    continue
                upper = next((i for i, (_, kl) in enumerate(pts) if kl >= target), None)
                if upper is None:
                    m_max, kl_max = max(pts, key=lambda p: p[1])
                    found[(t, sign)] = (None, kl_max, f"KL target {target} not reachable: "
                                        f"largest KL {kl_max:.4g} at alpha {sign * m_max:.4g}")  # fmt: skip
                    continue
                brackets.append((sign, pts[upper - 1][0], pts[upper][0]))
        if not brackets:
            break
        brackets = list(dict.fromkeys(brackets))  # targets sharing a bracket refine it once
        per = max(1, task.search_points // len(brackets))
        evaluate([(sign, float(m)) for sign, lo, hi in brackets
                  for m in np.linspace(lo, hi, per + 2)[1:-1]])  # fmt: skip
    for sign in signs:
        pts = sorted(seen[sign])
        for t, target in enumerate(targets):
            if (t, sign) not in found:
                m_best, kl_best = min(pts, key=lambda p: abs(p[1] - target))
                found[(t, sign)] = (None, kl_best, f"KL target {target} not within tolerance "
                                    f"{task.tolerance} after {passes} passes (closest {kl_best:.4g})")  # fmt: skip
    return found, passes


# --- generation ------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    hook: str,
    specs: list[tuple[str, torch.Tensor, tuple]],
    task,
    stats: dict | None = None,
    engine: str | None = None,
) -> list[str]:
    """One continuation per (prompt, steering vector, seed key), in batches of
    `task.batch_size` rows sharing a prompt, with a KV cache. Each row's random
    numbers come from its own seed key, so results do not depend on batching.
    `stats["tokens"]` counts the tokens generated (up to and including EOS).

    `engine` (default `task.engine`, else `lean`): `lean` decodes with `bench.decode`
    (same weights, same hook, a preallocated cache; about 1e-5 from TransformerLens's
    logits) where the model is supported, else falls back to `reference`,
    TransformerLens's own forward with its KV cache."""  # fmt: skip
    engine = engine or getattr(task, "engine", "lean")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {list(ENGINES)}")
    decoder = None
    if engine == "lean":
        reason = unsupported(model)
        if reason is None:
            decoder = LeanDecoder(model)
        else:
            log.info("lean decoder unavailable (%s); using TransformerLens's forward", reason)
    eos = model.tokenizer.eos_token_id
    texts: list[str | None] = [None] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: specs[i][0])  # group by prompt
    batches = [order[i : i + task.batch_size] for i in range(0, len(order), task.batch_size)]
    bar = tqdm(total=len(specs) * task.max_new_tokens, desc="steering: generate", unit="tok",
               leave=False)  # fmt: skip
    for rows in batches:
        prompts = {specs[i][0] for i in rows}
        groups = [[i for i in rows if specs[i][0] == p] for p in sorted(prompts)]
        for group in groups:
            tokens = model.to_tokens(specs[group[0]][0]).expand(len(group), -1)
            vectors = torch.stack([specs[i][1] for i in group]).to(tokens.device)
            uniform = torch.stack([_uniforms(specs[i][2], task.max_new_tokens) for i in group])
            step = _lean_steps if decoder is not None else _reference_steps
            out = torch.full((len(group), task.max_new_tokens), eos, dtype=torch.long)
            done = torch.zeros(len(group), dtype=torch.bool)
            steps = step(decoder or model, tokens, [(hook, _steer(vectors))], task.max_new_tokens)
            logits = next(steps)
            for t in range(task.max_new_tokens):
                nxt = sample_next(logits.float().cpu(), uniform[:, t], task)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                out[:, t] = nxt
                done |= nxt == eos
                bar.update(len(group))
                if done.all() or t == task.max_new_tokens - 1:
                    break
                logits = steps.send(nxt.to(tokens.device))
            steps.close()
            for i, row in zip(group, out.tolist(), strict=True):
                cut = row.index(eos) if eos in row else len(row)
                if stats is not None:
                    stats["tokens"] = stats.get("tokens", 0) + min(cut + 1, len(row))
                texts[i] = model.tokenizer.decode(row[:cut], skip_special_tokens=True)
    bar.close()
    return texts  # type: ignore[return-value]


def _reference_steps(model, tokens, hooks, max_new):
    """TransformerLens's own path: its forward with the hooks and its KV cache. A
    generator: yields the next-token logits, receives the chosen tokens."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cache = TransformerLensKeyValueCache.init_cache(model.cfg, tokens.device, len(tokens))
    step_input = tokens
    with model.hooks(fwd_hooks=hooks):
        while True:
            nxt = yield model(step_input, past_kv_cache=cache)[:, -1]
            step_input = nxt[:, None]


def _lean_steps(decoder, tokens, hooks, max_new):
    """The lean decoder's path (bench.decode), with the same protocol as _reference_steps."""
    nxt = yield decoder.prefill(tokens, hooks, max_new)
    while True:
        nxt = yield decoder.step(nxt, hooks)


def _uniforms(key: tuple, n: int) -> torch.Tensor:
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample_next(logits: torch.Tensor, u: torch.Tensor, task) -> torch.Tensor:
    """Top-k, then top-p (nucleus), then inverse-CDF sampling with the given uniforms."""
    if task.temperature == 0:
        return logits.argmax(-1)
    values, index = (logits / task.temperature).topk(min(task.top_k, logits.shape[-1]), dim=-1)
    probs = torch.softmax(values.double(), -1)
    keep = (probs.cumsum(-1) - probs) < task.top_p  # the smallest prefix reaching top_p
    probs = probs * keep
    cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1)
    pick = torch.searchsorted(cdf, u[:, None].to(cdf.dtype).contiguous()).clamp(
        max=values.shape[-1] - 1
    )
    return index.gather(1, pick)[:, 0]

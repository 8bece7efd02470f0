"""Steering mechanics: add vectors at a hook, measure the next-token KL, and sample
continuations with a KV cache (the alpha searches are in bench/alpha_search.py, the
sampler in bench/sampling.py).

`tasks/steering.py` runs the protocol with these; `benchmarks/steering.py`
measures them against sequential bisection and single-sequence generation.
Settings arguments are typed by the protocols `GenerationSettings` here and
`bench.alpha_search.SearchSettings`; the steering task satisfies both.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from bench.decode import LeanDecoder, unsupported
from bench.hooks import layer_of
from bench.sampling import SamplingSettings, sample_next, uniforms

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


def search_alpha(model, hook: str, direction: torch.Tensor, settings, signs=(1, -1)):
    """featbench's batched alpha search: `bench.alpha_search.search_alpha` (kept here for
    existing callers; the searches live in bench/alpha_search.py)."""
    from bench.alpha_search import search_alpha as batched

    return batched(model, hook, direction, settings, signs)


# --- generation ------------------------------------------------------------------

#: what `generate` returns per row: the continuation alone (special tokens skipped, cut
#: at the first EOS when generation stops there), or the reference's string: the BOS
#: text, the prompt and every sampled token, special tokens kept
JUDGED_TEXTS = ("continuation", "bos_prompt_continuation")


class GenerationSettings(SamplingSettings, Protocol):
    """What `generate` reads (the steering task has these fields)."""

    batch_size: int  # rows per batched forward
    max_new_tokens: int
    stop_at_eos: bool  # True: a row stops at its first EOS; False: always max_new_tokens
    judged_text: str  # one of JUDGED_TEXTS


@torch.no_grad()
def generate(
    model,
    hook: str,
    specs: list[tuple[str, torch.Tensor, tuple]],
    settings: GenerationSettings,
    stats: dict | None = None,
    engine: str | None = None,
) -> list[str]:
    """One text per (prompt, steering vector, seed key), in batches of
    `settings.batch_size` rows sharing a prompt, with a KV cache. Each row's random
    numbers come from its own seed key, so results do not depend on batching.
    `stats["tokens"]` counts the tokens generated (up to and including EOS when
    generation stops there). The text is `settings.judged_text` (JUDGED_TEXTS).

    `engine` (default `settings.engine`, else `lean`): `lean` decodes with `bench.decode`
    (same weights, same hook, a preallocated cache; about 1e-5 from TransformerLens's
    logits) where the model is supported, else falls back to `reference`,
    TransformerLens's own forward with its KV cache."""  # fmt: skip
    engine = engine or getattr(settings, "engine", "lean")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {list(ENGINES)}")
    stop, judged = settings.stop_at_eos, settings.judged_text
    if judged not in JUDGED_TEXTS:
        raise ValueError(f"judged_text={judged!r}: choose one of {list(JUDGED_TEXTS)}")
    decoder = None
    if engine == "lean":
        reason = unsupported(model)
        if reason is None:
            decoder = LeanDecoder(model)
        else:
            log.info("lean decoder unavailable (%s); using TransformerLens's forward", reason)
    eos = model.tokenizer.eos_token_id
    new = settings.max_new_tokens
    texts: list[str | None] = [None] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: specs[i][0])  # group by prompt
    batches = [
        order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)
    ]
    bar = tqdm(total=len(specs) * new, desc="steering: generate", unit="tok", leave=False)
    for rows in batches:
        prompts = {specs[i][0] for i in rows}
        groups = [[i for i in rows if specs[i][0] == p] for p in sorted(prompts)]
        for group in groups:
            tokens = model.to_tokens(specs[group[0]][0]).expand(len(group), -1)
            vectors = torch.stack([specs[i][1] for i in group]).to(tokens.device)
            uniform = torch.stack([uniforms(specs[i][2], new) for i in group])
            step = _lean_steps if decoder is not None else _reference_steps
            out = torch.full((len(group), new), eos, dtype=torch.long)
            done = torch.zeros(len(group), dtype=torch.bool)
            steps = step(decoder or model, tokens, [(hook, _steer(vectors))], new)
            logits = next(steps)
            for t in range(new):
                nxt = sample_next(logits.float().cpu(), uniform[:, t], settings)
                if stop:
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    done |= nxt == eos
                out[:, t] = nxt
                bar.update(len(group))
                if (stop and done.all()) or t == new - 1:
                    break
                logits = steps.send(nxt.to(tokens.device))
            steps.close()
            prefix = tokens[0].tolist()
            for i, row in zip(group, out.tolist(), strict=True):
                cut = row.index(eos) if stop and eos in row else len(row)
                if stats is not None:
                    stats["tokens"] = stats.get("tokens", 0) + min(cut + 1, len(row))
                texts[i] = _text(model.tokenizer, prefix, row[:cut], judged)
    bar.close()
    return texts  # type: ignore[return-value]


def _text(tokenizer, prefix: list[int], row: list[int], judged: str) -> str:
    if judged == "continuation":
        return tokenizer.decode(row, skip_special_tokens=True)
    # TransformerLens's to_string: every token, special ones included, spaces as decoded
    return tokenizer.decode(prefix + row, clean_up_tokenization_spaces=False)


def mlp_out_image(model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """What an MLP-hidden vector z writes to the residual stream in a model with a norm
    after the MLP (Gemma's `ln2_post`): ln2_post(b_out + z W_out), the vector the SNMF
    reference adds at `hook_mlp_out` for its Gemma features. Raises for a model without
    that norm (there the image is just z W_out and the hook can stay at mlp_post)."""
    block = model.blocks[layer]
    norm = getattr(block, "ln2_post", None)
    if norm is None:
        raise ValueError(f"{model.cfg.model_name}: block {layer} has no norm after its MLP")
    w_out = block.mlp.W_out
    out = block.mlp.b_out + z.to(w_out.device, w_out.dtype) @ w_out
    return norm(out[None, None])[0, 0].detach()


def post_norm_targets(model, features, unit: torch.Tensor, feats: list[int]) -> dict:
    """feature -> (unit vector, hook) for the paper's Gemma steering: on a model with a
    norm after the MLP, an mlp_post direction z is steered as ln2_post(b_out + z W_out)
    at hook_mlp_out. z is the feature's decoder column (decode(e_f) - decode(0): for SNMF
    the reference's raw column, whose scale matters next to b_out) where the method
    decodes, else its unit direction. Empty where that does not apply (another hook, a
    model without the norm: there the reference steers at mlp_post too)."""
    hook = features.hook
    if not (feats and hook.endswith("mlp.hook_post") and has_post_mlp_norm(model)):
        return {}
    layer = layer_of(hook)
    raw = unit[feats]
    if features.has_decoder:
        eye = torch.eye(len(features))[feats]
        raw = features.decode(eye) - features.decode(torch.zeros(1, len(features)))
    log.info("steering %d features at blocks.%d.hook_mlp_out through ln2_post", len(feats), layer)
    out = {}
    for f, z in zip(feats, raw, strict=True):
        v = mlp_out_image(model, layer, z.float()).float().cpu()
        out[f] = (v / v.norm().clamp_min(1e-12), f"blocks.{layer}.hook_mlp_out")
    return out


def has_post_mlp_norm(model) -> bool:
    """True for models that normalize the MLP's output before adding it (Gemma 2 and 3)."""
    return getattr(model.blocks[0], "ln2_post", None) is not None


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

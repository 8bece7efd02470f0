"""Steered generation: sample continuations with a vector added at a hook, in batches with
a KV cache (the lean decoder of `decode.py`, or TransformerLens's own forward), each row
from its own seed key (`sampling.py`); and the paper's Gemma mapping of an MLP-hidden
direction to its post-norm image at hook_mlp_out.

`tasks/steering.py` runs the protocol with these; `benchmarks/steering.py`
measures them against sequential bisection and single-sequence generation.
Settings arguments are typed by the protocols `GenerationSettings` here and
`bench.tasks.steering.calibrate.SearchSettings`; the steering task satisfies both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from bench.core.hooks import hook_name, is_mlp_post, layer_of
from bench.tasks.steering.decode import LeanDecoder, unsupported
from bench.tasks.steering.kl import steer_hook
from bench.tasks.steering.sampling import SamplingSettings, sample_next, uniforms

log = logging.getLogger(__name__)

ENGINES = ("lean", "reference")  # generation paths: the lean decoder, or TransformerLens's forward


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


class Row(NamedTuple):
    """One continuation to generate: its prompt, the vector added at the hook at every
    position, the seed key of its random numbers, and the hook (None: `generate`'s)."""

    prompt: str
    vector: torch.Tensor
    key: tuple
    hook: str | None = None


@torch.no_grad()
def generate(
    model,
    hook: str,
    specs: list[Row] | list[tuple],
    settings: GenerationSettings,
    stats: dict | None = None,
    engine: str | None = None,
) -> list[str]:
    """One text per row (`Row`, or a (prompt, vector, seed key) tuple steered at `hook`):
    `generate_batches` run to the end, its texts in the order of `specs`."""
    texts: list[str | None] = [None] * len(specs)
    for index, got in generate_batches(model, hook, specs, settings, stats, engine):
        for i, text in zip(index, got, strict=True):
            texts[i] = text
    return texts  # type: ignore[return-value]


@torch.no_grad()
def generate_batches(
    model,
    hook: str,
    specs: list[Row] | list[tuple],
    settings: GenerationSettings,
    stats: dict | None = None,
    engine: str | None = None,
) -> Iterator[tuple[list[int], list[str]]]:
    """Generate `specs` in batches of `settings.batch_size` rows with a KV cache, yielding
    each batch's (indices into `specs`, texts) as soon as it is done, in the order of
    `specs` (rows sharing a prompt share a batch; rows of any unit and any hook do). Each
    row's random numbers come from its own seed key, so a text does not depend on which
    rows share its batch. `stats["tokens"]` counts the tokens generated (up to and
    including EOS when generation stops there). The text is `settings.judged_text`
    (JUDGED_TEXTS).

    `engine` (default `settings.engine`, else `lean`): `lean` decodes with `bench.tasks.steering.decode`
    (same weights, same hook, a preallocated cache; about 1e-5 from TransformerLens's
    logits) where the model is supported, else falls back to `reference`,
    TransformerLens's own forward with its KV cache. When rows stop at EOS, the lean
    decoder drops finished rows from the batch (`COMPACT_AT`), so they cost nothing more."""
    engine = engine or getattr(settings, "engine", "lean")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {list(ENGINES)}")
    if settings.judged_text not in JUDGED_TEXTS:
        raise ValueError(
            f"judged_text={settings.judged_text!r}: choose one of {list(JUDGED_TEXTS)}"
        )
    rows = [Row(*spec) if not isinstance(spec, Row) else spec for spec in specs]
    rows = [row if row.hook else row._replace(hook=hook) for row in rows]
    decoder = None
    if engine == "lean":
        reason = unsupported(model)
        if reason is None:
            decoder = LeanDecoder(model)
        else:
            log.info("lean decoder unavailable (%s); using TransformerLens's forward", reason)
    order = sorted(range(len(rows)), key=lambda i: rows[i].prompt)  # stable: keeps input order
    size = settings.batch_size
    new = settings.max_new_tokens
    bar = tqdm(total=len(rows) * new, desc="steering: generate", unit="tok", leave=False)
    for batch in (order[i : i + size] for i in range(0, len(order), size)):
        for prompt in dict.fromkeys(rows[i].prompt for i in batch):
            group = [i for i in batch if rows[i].prompt == prompt]
            texts = _generate_group(
                model, decoder, [rows[i] for i in group], settings, stats, bar.update
            )
            yield group, texts
    bar.close()


#: the lean decoder drops finished rows once this fraction of the batch's live rows has
#: stopped (the copy of the cache costs about one step; each dropped row saves its share
#: of every later step)
COMPACT_AT = 1 / 8


def _generate_group(model, decoder, rows: list[Row], settings, stats, progress) -> list[str]:
    """The texts of rows that share one prompt, generated together; `progress(n)` is told
    of every n row-steps done (a finished row's remaining steps when it stops)."""
    eos, new, stop = model.tokenizer.eos_token_id, settings.max_new_tokens, settings.stop_at_eos
    tokens = model.to_tokens(rows[0].prompt).expand(len(rows), -1)
    vectors = _vectors_by_hook(rows, tokens.device)
    uniform = torch.stack([uniforms(row.key, new) for row in rows])
    out = torch.full((len(rows), new), eos, dtype=torch.long)
    alive = torch.arange(len(rows))  # rows still generating, as indices into `rows`
    if decoder is not None:
        steps = _LeanSteps(decoder, tokens, vectors, new)
    else:
        steps = _ReferenceSteps(model, tokens, vectors)
    logits = steps.first
    done = torch.zeros(len(rows), dtype=torch.bool)  # per live row: it has written EOS
    for t in range(new):
        nxt = sample_next(logits.float().cpu(), uniform[alive, t], settings)
        if stop:
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
        out[alive, t] = nxt
        progress(len(alive))
        if t == new - 1 or (stop and bool(done.all())):
            progress(len(alive) * (new - 1 - t))  # steps these rows no longer need
            break
        if steps.can_drop and int(done.sum()) >= max(1, len(alive) * COMPACT_AT):
            keep = (~done).nonzero()[:, 0]
            progress((len(alive) - len(keep)) * (new - 1 - t))  # the dropped rows' steps
            alive, nxt, done = alive[keep], nxt[keep], done[keep]
            steps.keep(keep)
        logits = steps.step(nxt.to(tokens.device))
    steps.close()
    prefix = tokens[0].tolist()
    texts = []
    for row in out.tolist():
        cut = row.index(eos) if stop and eos in row else len(row)
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + min(cut + 1, len(row))
        texts.append(_text(model.tokenizer, prefix, row[:cut], settings.judged_text))
    return texts


def _vectors_by_hook(rows: list[Row], device) -> dict[str, torch.Tensor]:
    """hook -> rows x width: each row's vector at its own hook, zeros at the others (adding
    0.0 changes no activation, so a row steered at one hook is unaffected by another's)."""
    out = {}
    for hook in dict.fromkeys(row.hook for row in rows):
        width = next(row.vector.shape[-1] for row in rows if row.hook == hook)
        zero = torch.zeros(width)
        out[hook] = torch.stack([row.vector if row.hook == hook else zero for row in rows]).to(
            device
        )
    return out


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
    if not (feats and is_mlp_post(hook) and has_post_mlp_norm(model)):
        return {}
    layer = layer_of(hook)
    raw = unit[feats]
    if features.has_decoder:
        eye = torch.eye(len(features))[feats]
        raw = features.decode(eye) - features.decode(torch.zeros(1, len(features)))
    target = hook_name(layer, "mlp_out")
    log.info("steering %d features at %s through ln2_post", len(feats), target)
    out = {}
    for f, z in zip(feats, raw, strict=True):
        v = mlp_out_image(model, layer, z.float()).float().cpu()
        out[f] = (v / v.norm().clamp_min(1e-12), target)
    return out


def has_post_mlp_norm(model) -> bool:
    """True for models that normalize the MLP's output before adding it (Gemma 2 and 3)."""
    return getattr(model.blocks[0], "ln2_post", None) is not None


class _ReferenceSteps:
    """TransformerLens's own path: its forward with the hooks and its KV cache (rows cannot
    be dropped from it)."""

    can_drop = False

    def __init__(self, model, tokens, vectors: dict[str, torch.Tensor]) -> None:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        self.model = model
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, tokens.device, len(tokens))
        self.hooks = [(hook, steer_hook(v)) for hook, v in vectors.items()]
        self.first = self.step(tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens if tokens.dim() == 2 else tokens[:, None]
        with self.model.hooks(fwd_hooks=self.hooks):
            return self.model(tokens, past_kv_cache=self.cache)[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.cache = None


class _LeanSteps:
    """The lean decoder's path (bench.tasks.steering.decode): prefill, then one token per step; finished
    rows can be dropped from its cache and from the steering vectors."""

    can_drop = True

    def __init__(self, decoder: LeanDecoder, tokens, vectors: dict[str, torch.Tensor], new):
        self.decoder, self.vectors = decoder, vectors
        self.first = decoder.prefill(tokens, self._hooks(), new)

    def _hooks(self) -> list:
        return [(hook, steer_hook(v)) for hook, v in self.vectors.items()]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(tokens, self._hooks())

    def keep(self, index: torch.Tensor) -> None:
        self.decoder.keep(index)
        self.vectors = {hook: v[index.to(v.device)] for hook, v in self.vectors.items()}

    def close(self) -> None:
        self.decoder.release()

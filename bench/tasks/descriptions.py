"""What a steered feature is judged against: one kind of description per comparison.

A description says which signs of steering it describes, and so which signs are
generated and judged at all:

- input-centric kinds describe what makes a feature fire, i.e. its positive
  side, and are judged on positively steered text only (sign +1):
  - `tokens`: the feature's top-activating train tokens (every method has them,
    DiffMean included, and the offline judge can read them);
  - `summary`: a writing judge's summary of the feature's top train contexts;
  - `label`: a concept name (for a protocol that steers one feature per
    concept; not a `task.steering.description` choice);
- `output_centric`: the tokens the direction promotes through the unembedding,
  one list per sign, each sign judged against its own list.

The SNMF paper's two kinds, written by a judge that can write (`bench/judges/writing.py`):

- `input_centric`: the feature's top train tokens by its train codes (positive codes
  only), each with up to 15 tokens of its sentence on either side; the top 10 go to
  the writer, whose `Results:` sentence is the description (none: no description);
- `output_summary`: `ln_final` of the steered vector (an MLP-hidden one through
  W_out first), projected on the unembedding (W_U and b_U), top 75 tokens per sign;
  the top 25 with their logits go to the writer, one description per sign. A sign the
  writer marks TRASH (no connection) is excluded from scoring, with that reason.

By default (`description_signs=described`) no description is reused for the sign it
does not describe, so no method gets two chances from one description. The paper
judges its one input-centric description against both signs (`description_signs=both`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bench.activations.set import ActivationSet
from bench.core.hooks import is_mlp_post, layer_of
from bench.errors import ConfigError
from bench.fit.contexts import encode_all, token_texts, top_contexts
from bench.fit.features import Features
from bench.judges.writing import (
    INPUT_DESCRIBE,
    INPUT_TOKENS,
    OUTPUT_DESCRIBE,
    OUTPUT_TOKENS,
    TRASH,
    input_lines,
    output_lines,
    results_section,
)

log = logging.getLogger(__name__)

#: the kinds `task.steering.description` may name
KINDS = ("tokens", "summary", "output_centric", "input_centric", "output_summary")
#: kinds that describe the positive side of a feature only
INPUT_CENTRIC = ("tokens", "summary", "label", "input_centric")
#: kinds a writing judge writes
WRITTEN = ("summary", "input_centric", "output_summary")
#: which signs an input-centric description is judged on: the one it describes, or both
SIGN_POLICIES = ("described", "both")
#: the paper's numbers: contexts and projected tokens the writer reads, the context
#: window (tokens each side, same sentence), and the projected tokens kept per sign
INPUT_TOP, OUTPUT_TOP, WINDOW, PROJECTED = 10, 25, 15, 75
#: top-activating rows scanned for distinct tokens (a feature firing on one token
#: everywhere would otherwise scan every row)
SCAN_ROWS = 4096


@dataclass(frozen=True)
class Description:
    """A feature's description: its kind and one text per sign it describes.

    `texts` is empty when no description could be made (`reason` says why);
    such a feature is not steered and its scores are missing.
    """

    kind: str
    texts: dict[int, str]
    concept: str | None = None  # the concept the feature stands for, when known
    reason: str | None = None
    excluded: dict[int, str] = field(default_factory=dict)  # sign -> why it is not scored (TRASH)
    examples: tuple[str, ...] = ()  # sentences of the concept, for a judge that reads them

    @property
    def signs(self) -> tuple[int, ...]:
        """The steering signs this description is judged on, positive first."""
        return tuple(sorted(self.texts, reverse=True))

    def for_signs(self, policy: str) -> Description:
        """`both`: an input-centric description judged on both signs (the paper's)."""
        if policy == "both" and self.kind in INPUT_CENTRIC and 1 in self.texts:
            return replace(self, texts={1: self.texts[1], -1: self.texts[1]})
        return self


def check_kind(kind: str, judge: Any) -> None:
    """Refuse a description kind the judge cannot provide (before anything loads)."""
    if kind not in KINDS:
        raise ConfigError(f"task.steering.description={kind!r}: must be one of {list(KINDS)}")
    if kind in WRITTEN and not getattr(judge, "can_write", False):
        name = getattr(judge, "name", None) or type(judge).__name__
        raise ConfigError(
            f"task.steering.description={kind} needs a judge that writes descriptions "
            f"(judge=openai or judge=hf_chat); judge {name} cannot. Use description=tokens "
            f"or description=output_centric"
        )


class Describer:
    """Describes the chosen features with one kind: the shared work (codes of the
    train tokens, top contexts) once at construction, the per-feature part (a
    writing judge's summary) on each call, so a checkpointed feature costs no
    judge request when a job resumes."""

    def __init__(
        self,
        kind: str,
        model: Any,
        features: Features,
        train: ActivationSet,
        judge: Any,
        chosen: list[int],
        unit: torch.Tensor,
        top: int,
        codes: torch.Tensor | None = None,
        steered: dict[int, tuple[torch.Tensor, str]] | None = None,
    ) -> None:
        """`codes`: the train rows' codes of every feature when the caller has them (the
        job's shared encodings); None encodes them here. `steered`: per feature, the
        vector and hook it is steered with, when not its unit direction at the features'
        hook (what `output_summary` projects)."""
        check_kind(kind, judge)
        self.kind, self.model, self.hook, self.judge, self.unit, self.top = (
            kind,
            model,
            features.hook,
            judge,
            unit,
            top,
        )
        self.steered = steered or {}
        labels = features.labels
        self.concept = {f: labels[f] or None for f in chosen} if labels is not None else {}
        self.column = {f: i for i, f in enumerate(chosen)}
        self.codes = self.contexts = None
        if kind in ("tokens", "summary", "input_centric") and chosen:
            self.codes = (encode_all(features, train) if codes is None else codes)[:, chosen]
            self.train = train
        if kind == "summary" and chosen:
            self.contexts = top_contexts(features, train, model.tokenizer, codes=self.codes)

    def __call__(self, f: int) -> Description:
        concept = self.concept.get(f)
        if self.kind == "output_centric":
            up, down = vocab_projection(self.model, self.hook, self.unit[f], self.top)
            return Description(self.kind, {1: token_list(up), -1: token_list(down)}, concept)
        if self.kind == "output_summary":
            vector, hook = self.steered.get(f, (self.unit[f], self.hook))
            return written_output(self.judge, self.model, hook, vector, self.top, concept)
        i = self.column[f]
        if self.kind == "tokens":
            tokens = top_tokens(self.codes[:, i], self.train, self.model.tokenizer, self.top)
            return Description(self.kind, {1: token_list(tokens)}, concept)
        if self.kind == "input_centric":
            items = token_contexts(self.codes[:, i], self.train, self.model.tokenizer, self.top)
            return written_input(self.judge, items, concept)
        text = self.judge.describe([c["context"] for c in self.contexts[i]])
        if not text:
            return Description(self.kind, {}, concept, reason="the judge wrote no description")
        return Description(self.kind, {1: text}, concept)


def token_contexts(
    codes: torch.Tensor, acts: ActivationSet, tokenizer: Any, top: int, window: int = WINDOW
) -> list[tuple[str, str, float]]:
    """(token, context, code) of the `top` rows with the largest positive code, strongest
    first: the paper's input-centric evidence. The context is the tokens of the same
    sentence within `window` positions either side, the token included."""
    positive = int((codes > 0).sum())
    if positive == 0:
        return []
    order = codes.topk(min(top, positive)).indices.tolist()
    out = []
    for row in order:
        sentence, position = int(acts.sentence_ids[row]), int(acts.positions[row])
        near = (acts.sentence_ids == sentence) & ((acts.positions - position).abs() <= window)
        ids = acts.token_ids[near].tolist()  # rows are in dataset order, positions ascending
        text = "".join(token_texts(tokenizer, ids))
        out.append(
            (
                tokenizer.decode([int(acts.token_ids[row])]),
                " ".join(text.split()),
                float(codes[row]),
            )
        )
    return out


def written_input(judge: Any, items: list[tuple[str, str, float]], concept) -> Description:
    """The paper's input-centric description: the writer's `Results:` sentence."""
    if not items:
        return Description(
            "input_centric", {}, concept, reason="no train token with a positive code"
        )
    answer = judge.write(INPUT_DESCRIBE.format(lines=input_lines(items)), INPUT_TOKENS)
    text, why = _results(answer)
    if text is None:
        return Description("input_centric", {}, concept, reason=why)
    return Description("input_centric", {1: text}, concept)


def written_output(
    judge: Any, model: Any, hook: str, vector: torch.Tensor, top: int, concept
) -> Description:
    """The paper's output-centric descriptions, one per sign; a TRASH sign is excluded."""
    texts, excluded = {}, {}
    for sign in (1, -1):
        tokens = projected_tokens(model, hook, sign * vector, PROJECTED)[:top]
        answer = judge.write(OUTPUT_DESCRIBE.format(lines=output_lines(tokens)), OUTPUT_TOKENS)
        text, why = _results(answer)
        if text is None:
            excluded[sign] = why
        elif TRASH in text:
            excluded[sign] = f"the writer found no connection (TRASH): {text[:80]!r}"
        else:
            texts[sign] = text
    reason = "; ".join(f"sign {s:+d}: {w}" for s, w in excluded.items()) if not texts else None
    return Description("output_summary", texts, concept, reason=reason, excluded=excluded)


def _results(answer: str | Exception) -> tuple[str | None, str | None]:
    if isinstance(answer, Exception):
        return None, f"the writer failed: {type(answer).__name__}: {answer}"
    text = results_section(answer)
    if text is None:
        snippet = " ".join((answer or "").split())[:80]
        return None, f"the writer's answer has no Results section: {snippet!r}"
    return text, None


def projected_tokens(
    model: Any, hook: str, vector: torch.Tensor, top: int
) -> list[tuple[str, float]]:
    """(token, logit) of the `top` tokens of unembed(ln_final(v)), v the vector's image in
    the residual stream (an MLP-hidden vector times W_out, no b_out), strongest first."""
    layer = layer_of(hook)
    v = vector.to(model.W_U.device, model.W_U.dtype)
    if is_mlp_post(hook):
        v = v @ model.blocks[layer].mlp.W_out
    with torch.no_grad():
        logits = model.unembed(model.ln_final(v[None, None]))[0, 0]
    values, index = logits.topk(min(top, logits.shape[-1]))
    return [
        (model.tokenizer.decode([i]), float(x))
        for i, x in zip(index.tolist(), values.tolist(), strict=True)
    ]


def label(concept: str, examples: Sequence[str] = ()) -> Description:
    """A concept label as an input-centric description (`food_and_drink` -> `food and drink`),
    with example sentences of the concept (its train split) for a judge that reads them."""
    return Description("label", {1: concept.replace("_", " ")}, concept, examples=tuple(examples))


def top_tokens(codes: torch.Tensor, acts: ActivationSet, tokenizer: Any, top: int) -> list[str]:
    """The `top` distinct tokens (stripped, non-empty) of the rows where a feature's
    code is largest, strongest first; none for a feature whose code never varies."""
    if len(codes) == 0 or bool((codes == codes[0]).all()):
        return []
    order = codes.topk(min(len(codes), SCAN_ROWS)).indices
    out: list[str] = []
    for token in dict.fromkeys(acts.token_ids[order].tolist()):
        text = tokenizer.decode([token]).strip()
        if text and text not in out:
            out.append(text)
            if len(out) == top:
                break
    return out


def vocab_projection(model, hook: str, direction: torch.Tensor, top: int) -> tuple[list, list]:
    """Top promoted tokens of a direction, for each sign: through W_out for an MLP
    hidden direction, then the final norm's scale and the unembedding."""
    layer = layer_of(hook)
    v = direction.to(model.W_U.device, model.W_U.dtype)
    if is_mlp_post(hook):
        v = v @ model.blocks[layer].mlp.W_out
    w = getattr(model.ln_final, "w", None)
    logits = (v * w if w is not None else v) @ model.W_U
    decode = model.tokenizer.decode
    return (
        [decode([i]) for i in logits.topk(top).indices.tolist()],
        [decode([i]) for i in (-logits).topk(top).indices.tolist()],
    )


def token_list(tokens: list[str]) -> str:
    seen = list(dict.fromkeys(t.strip() for t in tokens if t.strip()))
    return ", ".join(seen) if seen else "(no tokens)"

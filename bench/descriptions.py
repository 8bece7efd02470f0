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

No description is ever reused for the sign it does not describe, so no method
gets two chances from one description.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from bench.contexts import encode_all, top_contexts
from bench.errors import ConfigError
from methods.base import ActivationSet, Features

log = logging.getLogger(__name__)

#: the kinds `task.steering.description` may name
KINDS = ("tokens", "summary", "output_centric")
#: kinds that describe the positive side of a feature only
INPUT_CENTRIC = ("tokens", "summary", "label")
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

    @property
    def signs(self) -> tuple[int, ...]:
        """The steering signs this description is judged on, positive first."""
        return tuple(sorted(self.texts, reverse=True))


def check_kind(kind: str, judge: Any) -> None:
    """Refuse a description kind the judge cannot provide (before anything loads)."""
    if kind not in KINDS:
        raise ConfigError(f"task.steering.description={kind!r}: must be one of {list(KINDS)}")
    if kind == "summary" and not getattr(judge, "can_write", False):
        name = getattr(judge, "name", None) or type(judge).__name__
        raise ConfigError(
            f"task.steering.description=summary needs a judge that writes descriptions "
            f"(judge=openai or judge=hf_chat); judge {name} cannot. Use description=tokens "
            f"or description=output_centric"
        )


class Describer:
    """Describes the chosen features with one kind: the shared work (codes of the
    train tokens, top contexts) once at construction, the per-feature part (a
    writing judge's summary) on each call, so a checkpointed feature costs no
    judge request when a job resumes."""

    def __init__(self, kind: str, model: Any, features: Features, train: ActivationSet,
                 judge: Any, chosen: list[int], unit: torch.Tensor, top: int,
                 codes: torch.Tensor | None = None) -> None:  # fmt: skip
        """`codes`: the train rows' codes of every feature when the caller has them (the
        job's shared encodings); None encodes them here."""
        check_kind(kind, judge)
        self.kind, self.model, self.hook, self.judge, self.unit, self.top = (
            kind, model, features.hook, judge, unit, top)  # fmt: skip
        labels = features.labels
        self.concept = {f: labels[f] or None for f in chosen} if labels is not None else {}
        self.column = {f: i for i, f in enumerate(chosen)}
        self.codes = self.contexts = None
        if kind in ("tokens", "summary") and chosen:
            self.codes = (encode_all(features, train) if codes is None else codes)[:, chosen]
            self.train = train
        if kind == "summary" and chosen:
            self.contexts = top_contexts(features, train, model.tokenizer, codes=self.codes)

    def __call__(self, f: int) -> Description:
        concept = self.concept.get(f)
        if self.kind == "output_centric":
            up, down = vocab_projection(self.model, self.hook, self.unit[f], self.top)
            return Description(self.kind, {1: token_list(up), -1: token_list(down)}, concept)
        i = self.column[f]
        if self.kind == "tokens":
            tokens = top_tokens(self.codes[:, i], self.train, self.model.tokenizer, self.top)
            return Description(self.kind, {1: token_list(tokens)}, concept)
        text = self.judge.describe([c["context"] for c in self.contexts[i]])
        if not text:
            return Description(self.kind, {}, concept, reason="the judge wrote no description")
        return Description(self.kind, {1: text}, concept)


def label(concept: str) -> Description:
    """A concept label as an input-centric description (`food_and_drink` -> `food and drink`)."""
    return Description("label", {1: concept.replace("_", " ")}, concept)


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
    layer = int(hook.split(".")[1])
    v = direction.to(model.W_U.device, model.W_U.dtype)
    if hook.endswith("mlp.hook_post"):
        v = v @ model.blocks[layer].mlp.W_out
    w = getattr(model.ln_final, "w", None)
    logits = (v * w if w is not None else v) @ model.W_U
    decode = model.tokenizer.decode
    return ([decode([i]) for i in logits.topk(top).indices.tolist()],
            [decode([i]) for i in (-logits).topk(top).indices.tolist()])  # fmt: skip


def token_list(tokens: list[str]) -> str:
    seen = list(dict.fromkeys(t.strip() for t in tokens if t.strip()))
    return ", ".join(seen) if seen else "(no tokens)"

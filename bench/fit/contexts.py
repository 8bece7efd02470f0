"""Top-activating contexts: for each feature, the tokens where it fires most,
with +-15 tokens of their sentence around them.

These are the input of feature descriptions (the steering task's
`input_centric` description) and of the per-feature pages of the report
(features.md, and index.html, which shades each token by the feature's
activation there). One context per sentence, so a feature that fires on every token of one
sentence still shows several sentences.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bench.activations.set import ActivationSet
from bench.fit.features import Features

log = logging.getLogger(__name__)

INCOMPLETE = "\ufffd"  # what a tokenizer decodes an unfinished UTF-8 character to


def encode_all(features: Features, acts: ActivationSet, chunk: int = 8192) -> torch.Tensor:
    """n x k codes of every row of `acts`, in chunks."""
    out = [
        features.encode(acts.acts[i : i + chunk].float()).float().cpu()
        for i in range(0, len(acts), chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, len(features))


def sentence_max(codes: torch.Tensor, sentence_ids: torch.Tensor, n_sentences: int) -> torch.Tensor:
    """S x k: each sentence's largest code per feature (-inf for a sentence with no rows)."""
    best = torch.full((n_sentences, codes.shape[1]), -torch.inf)
    return best.scatter_reduce_(0, sentence_ids[:, None].expand_as(codes), codes, "amax")


def top_contexts(
    features: Features,
    acts: ActivationSet,
    tokenizer: Any,
    top: int = 5,
    window: int = 15,
    codes: torch.Tensor | None = None,
) -> list[list[dict]]:
    """Per feature, up to `top` contexts (distinct sentences), strongest first.

    A context holds its sentence, the top token's position, its `score` and `token`, the
    `context` text with the top token marked as [[token]], and, for shading each token by
    the feature's activation, the window's `tokens` (texts that join to the window's text),
    their `acts` (the feature's code at each token) and `top`, the top token's index in them.
    """
    codes = encode_all(features, acts) if codes is None else codes
    n_sentences = int(acts.sentence_ids.max()) + 1 if len(acts) else 0
    best = sentence_max(codes, acts.sentence_ids, n_sentences)
    rows_of = {}
    for row, sentence in enumerate(acts.sentence_ids.tolist()):
        rows_of.setdefault(sentence, []).append(row)
    result = []
    for f in range(codes.shape[1]):
        column = best[:, f]
        order = column.argsort(descending=True)[:top].tolist()
        contexts = []
        for sentence in order:
            if not torch.isfinite(column[sentence]):
                continue
            rows = rows_of[sentence]
            local = int(codes[rows, f].argmax())
            lo, hi = max(0, local - window), min(len(rows), local + window + 1)
            ids = acts.token_ids[rows].tolist()
            contexts.append(
                {
                    "sentence": sentence,
                    "position": int(acts.positions[rows[local]]),
                    "score": float(column[sentence]),
                    "token": tokenizer.decode([ids[local]]),
                    "context": tokenizer.decode(ids[lo:local])
                    + "[["
                    + tokenizer.decode([ids[local]])
                    + "]]"
                    + tokenizer.decode(ids[local + 1 : hi]),
                    "tokens": token_texts(tokenizer, ids[lo:hi]),
                    "acts": [float(f"{v:.4g}") for v in codes[rows[lo:hi], f].tolist()],
                    "top": local - lo,
                }
            )
        result.append(contexts)
    return result


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """One text per token that together spell `tokenizer.decode(ids)`: each token decoded
    alone when that joins up, else what each token adds to the decoded prefix, so that a
    character split over several byte-level tokens goes to the token that completes it."""
    alone = [tokenizer.decode([i]) for i in ids]
    whole = tokenizer.decode(ids)
    if "".join(alone) == whole:
        return alone
    texts, before = [], ""
    for end in range(1, len(ids) + 1):
        done = tokenizer.decode(ids[:end]).rstrip(INCOMPLETE)  # an unfinished character
        texts.append(done[len(before) :] if done.startswith(before) else alone[end - 1])
        before = done if done.startswith(before) else before + alone[end - 1]
    if texts and whole.startswith(before):
        texts[-1] += whole[len(before) :]  # the window ends inside a character
    return texts

"""The SNMF paper's generated sentences: for one feature, a writing judge writes sentences
that should activate it and unrelated (neutral) ones, from the feature's input-centric
description. Two protocols read them:

- concept detection (`task.concept_detection.protocol=paper`): each sentence's score
  is its largest token score, the cosine of the token's activation at the features'
  hook with the unit direction (the `projection` encoder, `bench.fit.encodings`), BOS and
  pads excluded; S_CD = log(mean activating score / mean neutral score);
- the paper's DiffMean baseline (`task.steering.direction=generated_diffmean`): the
  token-weighted mean activation at `hook_mlp_out` over the activating sentences minus
  that over the neutral ones, unit norm.

Writing (`write_sentences`) follows the reference's stopping rule: one request per
sentence, listing the sentences written so far, until `n` distinct non-empty sentences
exist or `max_failures` replies were empty, repeated or failed; activating first. A
prompt asked again (after a repeated sentence the list, hence the prompt, is unchanged)
is a new attempt, so the openai judge's cache, keyed by (endpoint, model, prompt,
attempt), replays the whole sequence on a rerun at no cost.

Activations are computed in right-padded batches under the causal mask, so a sentence's
tokens never see another sentence's pads (the reference's left padding without an
attention mask lets them; docs/paper-protocol.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.activations.extraction import bos_offset, tokenize
from bench.activations.set import ActivationSet
from bench.core.hooks import layer_of
from bench.fit.contexts import sentence_max
from bench.fit.encodings import ENCODERS
from bench.fit.features import Features
from bench.judges.writing import SENTENCE_TOKENS, sentence_prompt
from bench.tasks.detection import mean_or_none, s_cd_of

log = logging.getLogger(__name__)

MODES = ("activating", "neutral")
N_SENTENCES, MAX_FAILURES = (
    5,
    10,
)  # the reference's per mode: sentences wanted, failed tries allowed
BATCH = 32  # sentences per forward pass: generated sentences are short


@dataclass(frozen=True)
class Sentences:
    """One feature's generated sentences, and what writing them cost."""

    activating: list[str]
    neutral: list[str]
    failures: dict[str, int] = field(default_factory=dict)  # mode -> empty/repeated/failed replies
    requests: int = 0

    @property
    def reason(self) -> str | None:
        """Why there are fewer sentences than asked for (None when complete)."""
        short = [
            f"{len(getattr(self, m))} {m} ({self.failures.get(m, 0)} failed tries)"
            for m in MODES
            if len(getattr(self, m)) < N_SENTENCES
        ]
        return f"the writer gave only {', '.join(short)}" if short else None


def write_sentences(
    judge: Any, description: str, n: int = N_SENTENCES, max_failures: int = MAX_FAILURES
) -> Sentences:
    """`n` activating then `n` neutral sentences for `description`, by the stopping rule."""
    found: dict[str, list[str]] = {}
    failures: dict[str, int] = {}
    requests = 0
    for mode in MODES:
        got: list[str] = []
        failed, asked = 0, {}
        while len(got) < n and failed < max_failures:
            prompt = sentence_prompt(mode, description, got)
            asked[prompt] = asked.get(prompt, 0) + 1
            answer = judge.write(prompt, SENTENCE_TOKENS, attempt=asked[prompt])
            requests += 1
            text = "" if isinstance(answer, Exception) else answer.strip()
            if text and text not in got:
                got.append(text)
            else:
                failed += 1
        found[mode], failures[mode] = got, failed
    return Sentences(found["activating"], found["neutral"], failures, requests)


@torch.no_grad()
def sentence_activations(
    model: Any, sentences: list[str], hook: str, include_bos: bool = False
) -> list[torch.Tensor]:
    """Per sentence, its tokens' activations at `hook` (tokens x d, float32), in
    right-padded batches (the causal mask keeps pads out of every real token). The BOS
    row, where the model prepends one, is kept only with `include_bos`."""
    layer = layer_of(hook)
    ids, _ = tokenize(model, sentences)
    skip = 0 if include_bos else bos_offset(model)
    pad = model.tokenizer.pad_token_id or 0
    captured: dict[str, torch.Tensor] = {}

    def grab(activation: torch.Tensor, hook: Any) -> None:
        captured["x"] = activation

    out: list[torch.Tensor] = []
    for start in range(0, len(ids), BATCH):
        batch = ids[start : start + BATCH]
        width = max(len(t) for t in batch)
        tokens = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, t in enumerate(batch):
            tokens[row, : len(t)] = torch.tensor(t)
        model.run_with_hooks(
            tokens.to(model.cfg.device),
            fwd_hooks=[(hook, grab)],
            stop_at_layer=layer + 1,
            return_type=None,
        )
        x = captured.pop("x").float().cpu()
        out += [x[row, skip : len(t)] for row, t in enumerate(batch)]
    return out


def sentence_scores_for(
    features: Features, f: int, acts: list[torch.Tensor], encoder: str = "projection"
) -> list[float]:
    """Each sentence's largest token score for feature f under `encoder` (`projection`: the
    cosine with the unit direction, the paper's; -inf for a sentence without tokens)."""
    if not acts:
        return []
    rows = torch.cat(acts)
    ids = torch.cat([torch.full((len(a),), i, dtype=torch.long) for i, a in enumerate(acts)])
    zeros = torch.zeros(len(rows), dtype=torch.long)
    codes = ENCODERS[encoder](features, ActivationSet(rows, zeros, ids, zeros, features.hook))
    return sentence_max(codes[:, f : f + 1].float(), ids, len(acts))[:, 0].tolist()


def s_cd(activating: list[float], neutral: list[float]) -> tuple[float | None, str | None]:
    """log(mean activating score / mean neutral score), over all sentences (no split);
    missing with its reason when a side is empty or a mean is not positive."""
    return s_cd_of(activating, neutral, where="written")


def score_sentences(
    model: Any, features: Features, f: int, written: Sentences, encoders: list[str]
) -> tuple[list[dict], dict[str, dict[str, list[float]]]]:
    """Feature `f`'s S_CD on its written sentences, per encoder: the `s_cd` rows (a missing
    value with its reason when undefined), and encoder -> mode -> each sentence's score."""
    acts = {m: sentence_activations(model, getattr(written, m), features.hook) for m in MODES}
    rows, scores = [], {}
    for encoder in encoders:
        scored = {m: sentence_scores_for(features, f, a, encoder) for m, a in acts.items()}
        value, reason = s_cd(scored["activating"], scored["neutral"])
        if reason and written.reason:
            reason = f"{reason} ({written.reason})"
        scores[encoder] = scored
        rows.append(
            {
                "feature": f,
                "metric": "s_cd",
                "value": value,
                "reason": reason,
                "encoder": encoder,
                "n_activating": len(written.activating),
                "n_neutral": len(written.neutral),
                "mean_activating_score": mean_or_none(scored["activating"]),
                "mean_neutral_score": mean_or_none(scored["neutral"]),
            }
        )
    return rows, scores


def diffmean_vector(
    model: Any, sentences: Sentences, hook: str, include_bos: bool = False
) -> tuple[torch.Tensor | None, str | None]:
    """Unit(mean over the activating sentences' tokens - mean over the neutral ones') at
    `hook`, tokens pooled across sentences (a token-weighted mean); None with the reason
    when a side has no sentence or the difference is zero."""
    if not sentences.activating or not sentences.neutral:
        return None, sentences.reason or "no sentences"
    pos = torch.cat(sentence_activations(model, sentences.activating, hook, include_bos))
    neg = torch.cat(sentence_activations(model, sentences.neutral, hook, include_bos))
    d = pos.mean(0) - neg.mean(0)
    norm = float(d.norm())
    if not norm > 0:
        return None, "the generated sentences' mean activations are identical"
    return d / (norm + 1e-8), None


def generated_diffmean(model, hook: str, description: str, judge, bos: bool) -> tuple:
    """The SNMF paper's DiffMean arm for one feature: sentences written from its
    description (`write_sentences`), and the DiffMean of their activations at `hook`.
    Returns (unit vector or None, why None, {"n_activating", "n_neutral"})."""
    sentences = write_sentences(judge, description)
    info = {"n_activating": len(sentences.activating), "n_neutral": len(sentences.neutral)}
    vector, why = diffmean_vector(model, sentences, hook, bos)
    return vector, why, info

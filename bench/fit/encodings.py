"""A job's encodings of its activations: computed once, shared by every task.

A method's `encode` can be costly (SNMF's is an iterative non-negative solve), and
several stages need the same numbers: the top-activating contexts, concept detection
(sentence scores per encoder), the concept-paired steering protocol (the same train
sentence scores, to match features to concepts), the steering descriptions (top train
tokens) and reconstruction (decode of the test tokens' codes, spliced into the model).
`Encodings` computes each encoder's token codes for every row of the job's activations
once, on first use, and the sentence scores from them; `TaskData.encodings(features)`
hands every task the same object.

Encoders (the `encoder` column of concept detection):

- `native`: the method's own `encode` (TopK codes, SNMF's coefficients, projections);
- `projection`: the cosine of each row with each unit direction, the same for every
  method (the SNMF paper's detection score); a zero direction or row has cosine 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bench.activations.set import ActivationSet
from bench.fit.contexts import encode_all, sentence_max
from bench.fit.features import Features

log = logging.getLogger(__name__)

CHUNK = 8192  # rows per encode call: bounds the temporaries of a k x d encoder


def projection_codes(features: Features, acts: ActivationSet, chunk: int = CHUNK) -> torch.Tensor:
    """n x k cosine of every row of `acts` with every unit direction (0 for a zero vector)."""
    unit = torch.nn.functional.normalize(features.directions.float(), dim=1)
    out = []
    for i in range(0, len(acts), chunk):
        x = torch.nn.functional.normalize(acts.acts[i : i + chunk].float(), dim=1)
        out.append((x @ unit.T.to(x.device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(features))


ENCODERS: dict[str, Callable[[Features, ActivationSet], torch.Tensor]] = {
    "native": encode_all,
    "projection": projection_codes,
}


class Encodings:
    """The codes of every row of `acts` under each encoder, made on first use and kept.

    `tokens(encoder)` is n x k (rows as in `acts`); `sentences(encoder)` is S x k, each
    sentence's largest code per feature (-inf for a sentence without rows);
    `rows(sentences)` is the boolean row mask of some sentences, in `acts.subset` order.
    """

    def __init__(self, features: Features, acts: ActivationSet, n_sentences: int) -> None:
        self.features, self.acts, self.n_sentences = features, acts, n_sentences
        self._tokens: dict[str, torch.Tensor] = {}
        self._sentences: dict[str, np.ndarray] = {}

    def tokens(self, encoder: str = "native") -> torch.Tensor:
        if encoder not in ENCODERS:
            raise ValueError(f"encoder={encoder!r}: choose one of {list(ENCODERS)}")
        if encoder not in self._tokens:
            log.debug("encoding %d rows with the %s encoder", len(self.acts), encoder)
            self._tokens[encoder] = ENCODERS[encoder](self.features, self.acts)
        return self._tokens[encoder]

    def sentences(self, encoder: str = "native") -> np.ndarray:
        if encoder not in self._sentences:
            codes = self.tokens(encoder)
            best = sentence_max(codes, self.acts.sentence_ids, self.n_sentences)
            self._sentences[encoder] = best.numpy()
        return self._sentences[encoder]

    def rows(self, sentences: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Mask of the rows of `sentences`: `tokens()[mask]` aligns with `acts.subset(...)`."""
        wanted = torch.as_tensor(np.asarray(sentences), dtype=torch.long)
        return torch.isin(self.acts.sentence_ids, wanted)

    def decoded(self, mask: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
        """decode(native codes) of the masked rows, float32 (features with a decoder only)."""
        codes = self.tokens("native")[mask]
        parts = [
            self.features.decode(codes[i : i + chunk].float()).float().cpu()
            for i in range(0, len(codes), chunk)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.acts.d)

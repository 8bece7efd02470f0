"""`ActivationSet`: token x d activations at one hook, with each row's provenance (its
sentence, position and token). What extraction returns and what a method fits on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ActivationSet:
    """Token x d activations at one hook, with the rows' provenance.

    Row i is token `token_ids[i]` at position `positions[i]` of sentence
    `sentence_ids[i]` (an index into the dataset). Pad and BOS positions are
    never rows. `sentence_labels[j]` is sentence j's concept (None when the
    data are unlabeled); `token_labels()` expands it to rows.
    """

    acts: torch.Tensor
    token_ids: torch.Tensor
    sentence_ids: torch.Tensor
    positions: torch.Tensor
    hook: str
    sentence_labels: Sequence[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.acts.shape[0]
        for name in ("token_ids", "sentence_ids", "positions"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"ActivationSet.{name} has shape {tuple(getattr(self, name).shape)}, expected ({n},)"
                )

    def __len__(self) -> int:
        return self.acts.shape[0]

    @property
    def d(self) -> int:
        return self.acts.shape[1]

    def token_labels(self) -> list[str]:
        if self.sentence_labels is None:
            raise ValueError(f"activations at {self.hook} carry no concept labels")
        return [self.sentence_labels[i] for i in self.sentence_ids.tolist()]

    def subset(self, sentence_indices: Sequence[int] | torch.Tensor) -> ActivationSet:
        """The rows of the given sentences (e.g. the train split)."""
        wanted = torch.as_tensor(sentence_indices, dtype=torch.long)
        mask = torch.isin(self.sentence_ids, wanted)
        return ActivationSet(
            acts=self.acts[mask],
            token_ids=self.token_ids[mask],
            sentence_ids=self.sentence_ids[mask],
            positions=self.positions[mask],
            hook=self.hook,
            sentence_labels=self.sentence_labels,
            meta=dict(self.meta),
        )


def as_matrix(acts: ActivationSet | torch.Tensor) -> torch.Tensor:
    """The activation rows of an ActivationSet, or the tensor itself."""
    return acts.acts if isinstance(acts, ActivationSet) else acts

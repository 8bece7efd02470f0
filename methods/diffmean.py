"""DiffMean: the supervised reference direction for each concept.

For concept c, the direction is mean(acts of c's tokens) - mean(acts of all
other tokens), scaled to unit norm. Neutral tokens count among the "others";
the neutral label gets no direction. Each feature carries its concept label,
so tasks can score it against that concept directly; its numbers are an upper
reference for the unsupervised methods (it saw the labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.data.datasets import NEUTRAL
from bench.errors import ConfigError
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method, NotResizable

log = logging.getLogger(__name__)


@dataclass
class DiffMean(Method):
    name: ClassVar[str] = "diffmean"
    requires_labels: ClassVar[bool] = True

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> DiffMean:
        """Not resizable: DiffMean has one direction per concept of the labels, no setting."""
        raise NotResizable(
            "diffmean learns one direction per labeled concept; its feature count is the data's"
        )

    def fit(self, acts: ActivationSet) -> Features:
        labels = acts.token_labels()
        concepts = sorted(set(labels) - {NEUTRAL})
        if len(concepts) < 2 and NEUTRAL not in labels:
            raise ConfigError(
                f"DiffMean needs tokens of at least two labels to contrast; got {sorted(set(labels))}"
            )
        x = acts.acts.float()
        index = {c: i for i, c in enumerate(sorted(set(labels)))}
        label_ids = torch.tensor([index[label] for label in labels])
        one_hot = torch.nn.functional.one_hot(label_ids, len(index)).float()  # n x L
        sums, counts = one_hot.T @ x, one_hot.sum(0)  # L x d, L
        total, n = x.sum(0), x.shape[0]
        directions = []
        for concept in concepts:
            i = index[concept]
            inside = sums[i] / counts[i]
            outside = (total - sums[i]) / (n - counts[i])
            directions.append(inside - outside)
        stacked = torch.stack(directions)
        norms = stacked.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            zero = [c for c, z in zip(concepts, (norms == 0).flatten().tolist(), strict=True) if z]
            raise ConfigError(
                f"DiffMean: concepts {zero} have the same mean as the rest at {acts.hook}"
            )
        log.info("diffmean: %d concept directions at %s", len(concepts), acts.hook)
        return Features(stacked / norms, method=self.name, hook=acts.hook, labels=concepts)

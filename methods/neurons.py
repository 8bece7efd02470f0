"""Control: single neurons (basis directions) with the highest variance.

The `n_features` coordinates of the hook's space whose activations vary most
over the train tokens, as unit basis vectors. In `mlp_post` these are MLP
neurons, the unit of analysis before directions; a method that finds
features has to beat them. Encoding reads the neuron's value; decoding puts
the kept neurons back (every other coordinate at its train mean).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from bench.errors import ConfigError
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method


class NeuronFeatures(Features):
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        mean = self.extra["mean"]
        out = mean.expand(codes.shape[0], -1).clone()
        out[:, self.extra["index"].long()] = codes.float()
        return out


@dataclass
class Neurons(Method):
    name: ClassVar[str] = "neurons"

    n_features: int = 100  # same count as SNMF's default rank

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> Neurons:
        """`n_features` <- k. The generator's sparsity, when given, is not used: this method
        has no sparsity setting."""
        return replace(self, n_features=k)

    def fit(self, acts: ActivationSet) -> Features:
        if not 1 <= self.n_features <= acts.d:
            raise ConfigError(
                f"method.n_features={self.n_features}: must be in 1..{acts.d} (the hook's width)"
            )
        x = acts.acts.float()
        variance = x.var(dim=0)
        index = variance.argsort(descending=True, stable=True)[: self.n_features]
        directions = torch.zeros(self.n_features, acts.d)
        directions[torch.arange(self.n_features), index] = 1.0
        return NeuronFeatures(
            directions,
            method=self.name,
            hook=acts.hook,
            info={"neurons": index.tolist()},
            extra={"index": index.to(torch.int64), "mean": x.mean(dim=0)},
        )

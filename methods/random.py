"""Control: random Gaussian directions.

As many unit directions as the compared method has features (`n_features`),
drawn from an isotropic Gaussian in the hook's space, seeded by the run's
seed (so a seed sweep draws new controls). A
score this control reaches is what chance buys; a method has to beat it.
Encoding is the projection on each direction; there is no decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from bench.errors import ConfigError
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method


@dataclass
class RandomDirections(Method):
    name: ClassVar[str] = "random"

    n_features: int = 100  # same count as SNMF's default rank, so the comparison is like for like
    seed: int = 42  # the run's seed, handed over by the job (Method.seeded): same seed, same draw

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> RandomDirections:
        """`n_features` <- k. The generator's sparsity, when given, is not used: this method
        has no sparsity setting."""
        return replace(self, n_features=k)

    def fit(self, acts: ActivationSet) -> Features:
        if self.n_features < 1:
            raise ConfigError(f"method.n_features={self.n_features}: must be >= 1")
        gen = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.n_features, acts.d, generator=gen)
        directions = directions / directions.norm(dim=1, keepdim=True)
        return Features(directions, method=self.name, hook=acts.hook, info={"seed": self.seed})

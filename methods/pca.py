"""Control: the top principal directions of the train activations.

The `n_features` leading right singular vectors of the centered activation
matrix, signs fixed so that each direction's largest-|.| coordinate is
positive (deterministic output). Encoding is the projection of the centered
activation; decoding adds the mean back. PCA explains the most variance
with k directions, so it bounds what reconstruction alone can show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from bench.errors import ConfigError
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method

log = logging.getLogger(__name__)


class PCAFeatures(Features):
    def encode(self, acts: ActivationSet | torch.Tensor) -> torch.Tensor:
        x = acts.acts if isinstance(acts, ActivationSet) else acts
        return (x.float() - self.extra["mean"]) @ self.directions.T

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() @ self.directions + self.extra["mean"]


@dataclass
class PCA(Method):
    name: ClassVar[str] = "pca"

    n_features: int = 100  # same count as SNMF's default rank

    def bounded_rank(self) -> int:
        return self.n_features  # a factorization's rank: at most min(tokens, width)

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> PCA:
        """`n_features` <- k. The generator's sparsity, when given, is not used: this method
        has no sparsity setting."""
        return replace(self, n_features=k)

    def fit(self, acts: ActivationSet) -> Features:
        if not 1 <= self.n_features <= min(len(acts), acts.d):
            raise ConfigError(
                f"method.n_features={self.n_features}: must be in 1..{min(len(acts), acts.d)} "
                "(at most the number of tokens and the hook's width)"
            )
        x = acts.acts.float()
        mean = x.mean(dim=0)
        covariance = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
        values, vectors = torch.linalg.eigh(covariance.double())
        order = values.argsort(descending=True)[: self.n_features]
        directions = vectors[:, order].T.float()
        signs = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
        directions = directions * signs
        total = float(values.clamp_min(0).sum())
        if total > 0:
            explained = (values[order].clamp_min(0) / total).tolist()
        else:  # constant activations: no variance to explain, and no NaN ratio either
            log.warning("pca: activations at %s have no variance; ratios are 0", acts.hook)
            explained = [0.0] * self.n_features
        return PCAFeatures(
            directions,
            method=self.name,
            hook=acts.hook,
            info={"explained_variance_ratio": explained},
            extra={"mean": mean},
        )

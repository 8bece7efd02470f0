"""The method plugin contract, re-exported for plugins: `Method.fit(ActivationSet) ->
Features` (defined in `bench.fit.method`, `bench.fit.features` and
`bench.activations.set`; see `bench/fit/method.py` for the contract). A plugin imports
them from here: `from featbench.methods.base import ActivationSet, Features, Method`.
Artifacts saved by older versions name `featbench.methods.base.Features` (or
`methods.<module>.<class>`) and still load through these names."""

from __future__ import annotations

from bench.activations.set import ActivationSet
from bench.fit.features import (
    FEATURES_JSON,
    FEATURES_TENSORS,
    FORMAT_VERSION,
    LEGACY_PREFIX,
    ArtifactError,
    Features,
)
from bench.fit.method import GeneratorInfo, Method, NotResizable

__all__ = [
    "FEATURES_JSON",
    "FEATURES_TENSORS",
    "FORMAT_VERSION",
    "LEGACY_PREFIX",
    "ActivationSet",
    "ArtifactError",
    "Features",
    "GeneratorInfo",
    "Method",
    "NotResizable",
]

"""The method contract: `Method.fit(ActivationSet) -> Features`.

A method is any importable class named by `_target_` in a YAML under `conf/method/` (or on
the command line). Its constructor arguments are its typed config: write it as a
dataclass whose fields carry the defaults, each with a comment that says why. `fit`
receives the cached activations at one hook and returns `Features`:

- `directions`: k x d, in the hook's space (rows are unit norm unless the subclass
  documents another norm), d the hook's width (`acts.d`); the job checks the shape;
- `encode(acts) -> n x k` coefficients (default: projection on the directions);
- `decode(codes) -> n x d` where the method has a decoder (default: none);
- `labels`: an optional concept name per feature (supervised methods);
- `save(dir)` / `load(dir)`: safetensors tensors + a JSON file naming the method and the
  Features class: nothing that can execute code on load.

Plugins import these through `featbench.methods.base`, which re-exports them.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from bench.activations.set import ActivationSet
from bench.errors import FeatbenchError
from bench.fit.features import Features


@dataclass(frozen=True)
class GeneratorInfo:
    """What a task may tell `Method.at_capacity` about planted data beyond the capacity.

    A task passes either nothing (capacity only) or this whole object, the same to every
    method, so that no family of methods is told more than another.
    """

    neuron_density: float  # fraction of coordinates a true feature uses: ceil(p d) of d; 1 = dense
    active_per_token: float  # expected number of true features active on one token


class NotResizable(FeatbenchError):
    """A method whose number of features is not its config's to set (pretrained weights,
    one direction per concept); `at_capacity` raises it with the reason."""


class Method(ABC):
    """A feature-discovery method. Subclasses are dataclasses of their config."""

    #: value of the results' `method` column (None: the class name in lower case)
    name: ClassVar[str | None] = None
    #: True when fit needs concept labels (supervised methods)
    requires_labels: ClassVar[bool] = False

    @abstractmethod
    def fit(self, acts: ActivationSet) -> Features:
        """Find features in `acts` (the train split's tokens)."""

    def seeded(self, seed: int) -> Method:
        """This method with the run's seed: the one way a method gets it. The job calls it
        before `fit` (and synthetic recovery after resizing); a dataclass method with a
        `seed` field gets a copy with `seed` set, any other method is returned as it is.
        Method configs carry no `seed` key: the run's `seed` is the only one."""
        if dataclasses.is_dataclass(self) and any(
            f.name == "seed" for f in dataclasses.fields(self)
        ):
            return dataclasses.replace(self, seed=seed)
        return self

    def bounded_rank(self) -> int | None:
        """The feature count that cannot exceed min(train tokens, hook width), as a
        factorization's rank cannot; the job checks it before the model loads where it can.
        None (the default): no such bound (an overcomplete SAE, one direction per concept)."""
        return None

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> Method:
        """This method resized to learn `k` features: a new instance (`dataclasses.replace`),
        `self` unchanged. Tasks that plant a known number of features (synthetic recovery)
        call it instead of editing config keys, and record what changed.

        `generator` is what the task chose to reveal beyond the capacity: None means capacity
        only, and the method keeps its own sparsity settings, or derives them from `k` alone
        by a rule its docstring states; a `GeneratorInfo` lets it set them from the planted
        data's neuron density and active features per token. Everything not about capacity
        or sparsity (seed, iterations, device) stays as configured.

        Raise `NotResizable` with the reason when the method's feature count is not its
        config's to choose. The default does, so a plugin without this hook is reported, not
        silently fitted at the wrong size.
        """
        raise NotResizable(
            f"{type(self).__name__} does not say how it is resized to a capacity "
            "(implement Method.at_capacity)"
        )

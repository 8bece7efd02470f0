"""The method plugin contract: `Method.fit(ActivationSet) -> Features`.

A method is any importable class named by `_target_` in a YAML under
`conf/method/` (or on the command line). Its constructor arguments are its
typed config: write it as a dataclass whose fields carry the defaults, each
with a comment that says why. `fit` receives the cached activations at one
hook and returns `Features`:

- `directions`: k x d, in the hook's space (rows are unit norm unless the
  subclass documents another norm);
- `encode(acts) -> n x k` coefficients (default: projection on the directions);
- `decode(codes) -> n x d` where the method has a decoder (default: none);
- `labels`: an optional concept name per feature (supervised methods);
- `save(dir)` / `load(dir)`: safetensors tensors + a JSON file naming the
  method and the Features class: nothing that can execute code on load.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bench.errors import FeatbenchError
from bench.storage import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

FEATURES_JSON = "features.json"
LEGACY_PREFIX = "methods."  # class names in features.json written before the rename
FEATURES_TENSORS = "features.safetensors"
FORMAT_VERSION = 1


class ArtifactError(FeatbenchError, ValueError):
    """A saved Features artifact that cannot be loaded (missing, tampered, truncated)."""


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


def _as_matrix(acts: ActivationSet | torch.Tensor) -> torch.Tensor:
    return acts.acts if isinstance(acts, ActivationSet) else acts


class Features:
    """Directions found by a method, and how to encode activations with them.

    Subclasses that keep more tensors (an encoder, a bias) pass them in
    `extra` and override `encode`/`decode`; `save`/`load` round-trip them.
    """

    def __init__(
        self,
        directions: torch.Tensor,
        *,
        method: str,
        hook: str,
        labels: Sequence[str | None] | None = None,
        info: dict[str, Any] | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if directions.ndim != 2:
            raise ValueError(f"directions must be k x d, got shape {tuple(directions.shape)}")
        if labels is not None and len(labels) != directions.shape[0]:
            raise ValueError(f"{len(labels)} labels for {directions.shape[0]} directions")
        self.directions = directions.float().contiguous()
        self.method = method
        self.hook = hook
        self.labels = list(labels) if labels is not None else None
        self.info = dict(info or {})
        self.extra = {k: v.contiguous() for k, v in (extra or {}).items()}
        self.provenance: dict[str, Any] = {}  # set by save(..., provenance) or load

    def __len__(self) -> int:
        return self.directions.shape[0]

    @property
    def d(self) -> int:
        return self.directions.shape[1]

    @property
    def has_decoder(self) -> bool:
        return type(self).decode is not Features.decode

    def encode(self, acts: ActivationSet | torch.Tensor) -> torch.Tensor:
        """n x k coefficients; the default is the projection on each direction."""
        x = _as_matrix(acts)
        return x.to(self.directions.dtype) @ self.directions.T.to(x.device)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.method} features have no decoder")

    def save(self, directory: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write the tensors and the JSON; `provenance` (what the features were fitted on:
        model and fingerprint, layer, hook, dataset hash, config hash, code version) goes
        into the JSON, so the artifact says where it came from."""
        directory = Path(directory)
        if provenance is not None:
            self.provenance = dict(provenance)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "directions": self.directions,
            **{f"extra.{k}": v for k, v in self.extra.items()},
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(directory / FEATURES_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "format_version": FORMAT_VERSION,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "method": self.method,
            "hook": self.hook,
            "k": len(self),
            "d": self.d,
            "labels": self.labels,
            "extra": sorted(self.extra),
            "info": self.info,
            "provenance": self.provenance,
        }
        atomic_write_text(directory / FEATURES_JSON, json.dumps(meta, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Features:
        """Load an artifact written by `save`; any inconsistency is an ArtifactError."""
        directory = Path(directory)
        meta_path, tensor_path = directory / FEATURES_JSON, directory / FEATURES_TENSORS
        for path in (meta_path, tensor_path):
            if not path.is_file():
                raise ArtifactError(f"{path}: missing; not a featbench features artifact")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{meta_path}: not valid JSON ({err})") from None
        required = ("format_version", "class", "method", "hook", "k", "d", "extra")
        if not isinstance(meta, dict) or any(key not in meta for key in required):
            raise ArtifactError(f"{meta_path}: expected keys {list(required)}")
        if not isinstance(meta["extra"], list) or not isinstance(meta["class"], str):
            raise ArtifactError(f"{meta_path}: 'extra' must be a list and 'class' a string")
        if meta["format_version"] != FORMAT_VERSION:
            raise ArtifactError(
                f"{meta_path}: format_version {meta['format_version']}, expected {FORMAT_VERSION}"
            )
        feature_cls = _features_class(meta["class"], meta_path)
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ArtifactError(f"{tensor_path}: unreadable safetensors file ({err})") from None
        directions = tensors.get("directions")
        if directions is None or tuple(directions.shape) != (meta["k"], meta["d"]):
            shape = None if directions is None else tuple(directions.shape)
            raise ArtifactError(
                f"{tensor_path}: directions of shape {shape}, JSON says ({meta['k']}, {meta['d']})"
            )
        extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        if sorted(extra) != sorted(meta["extra"]):
            raise ArtifactError(
                f"{tensor_path}: tensors {sorted(extra)} do not match JSON {meta['extra']}"
            )
        if not torch.isfinite(directions).all():
            raise ArtifactError(f"{tensor_path}: directions contain NaN or Inf")
        try:
            features = feature_cls(
                directions,
                method=meta["method"],
                hook=meta["hook"],
                labels=meta.get("labels"),
                info=meta.get("info") or {},
                extra=extra,
            )
        except (ValueError, TypeError, KeyError) as err:  # a field the class rejects
            raise ArtifactError(f"{meta_path}: inconsistent with {meta['class']} ({err})") from None
        provenance = meta.get("provenance")
        features.provenance = dict(provenance) if isinstance(provenance, dict) else {}
        return features


def _features_class(path: str, meta_path: Path) -> type[Features]:
    """Resolve the JSON's class name; only Features subclasses are accepted. Artifacts
    saved before methods/ installed as `featbench.methods` name `methods.<module>`."""
    from hydra.utils import get_class

    if path.startswith(LEGACY_PREFIX):
        path = "featbench." + path
    try:
        feature_cls = get_class(path)
    except Exception as err:  # Hydra wraps import failures in several types
        raise ArtifactError(f"{meta_path}: class {path!r} cannot be imported ({err})") from None
    if not (isinstance(feature_cls, type) and issubclass(feature_cls, Features)):
        raise ArtifactError(f"{meta_path}: class {path!r} is not a featbench Features class")
    return feature_cls


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

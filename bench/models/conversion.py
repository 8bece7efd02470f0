"""A loaded transformers causal LM into a TransformerLens `HookedTransformer`, with its
weights unprocessed (no LayerNorm folding, no centring), so hooks see what the model
computes. TransformerLens reads the architecture from the checkpoint's config.json (a
temporary folder) or, where its local-config path does not know the architecture
(Gemma 3), from a built-in config named by `model.source.tl_config`; nothing is fetched.
`bench.models` caches the result; this module only converts."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.errors import ConfigError
from bench.models.sources import ModelUnavailable


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


@contextlib.contextmanager
def _tl_name(hf_config: dict, tl_config: str | None) -> Iterator[str]:
    """What TransformerLens's loaders take as the model's name: the built-in config
    `tl_config` names, else a temporary folder holding the checkpoint's config.json."""
    if tl_config is None:
        with _config_folder(hf_config) as folder:
            yield folder
        return
    from transformer_lens import loading_from_pretrained as loading

    try:
        loading.get_official_model_name(tl_config)
    except ValueError:
        raise ConfigError(
            f"model.source.tl_config={tl_config!r} is not a TransformerLens model name "
            "(transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
        ) from None
    yield tl_config


def _tl_config(hf_config: dict, n_ctx: int | None, tl_config: str | None = None) -> Any:
    from transformer_lens import loading_from_pretrained as loading

    with _tl_name(hf_config, tl_config) as name:
        cfg = loading.get_pretrained_model_config(
            name, hf_cfg=hf_config, fold_ln=False, device="cpu", dtype=torch.float32, n_ctx=n_ctx
        )
    _check_architecture(cfg, hf_config, tl_config)
    return cfg


def _check_architecture(cfg: Any, hf_config: dict, tl_config: str | None) -> None:
    """A named TransformerLens config must describe the checkpoint in hand."""
    if tl_config is None:
        return
    want = {
        "original_architecture": (hf_config.get("architectures") or [None])[0],
        "n_layers": hf_config.get("num_hidden_layers"),
        "d_model": hf_config.get("hidden_size"),
        "d_mlp": hf_config.get("intermediate_size"),
        "d_vocab": hf_config.get("vocab_size"),
    }
    wrong = {
        k: (getattr(cfg, k), v) for k, v in want.items() if v is not None and getattr(cfg, k) != v
    }
    if wrong:
        raise ModelUnavailable(
            f"model.source.tl_config={tl_config!r} does not describe this checkpoint: "
            + ", ".join(f"{k} {ours} != {theirs}" for k, (ours, theirs) in wrong.items())
        )


def _hooked(cfg: Any, tokenizer: Any) -> Any:
    from transformer_lens import HookedTransformer

    # Right padding whatever the tokenizer's own default (Gemma's is left): featbench
    # pads batches on the right and keeps positions from 0.
    return HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")


def hooked_from_hf(
    hf_model: Any, tokenizer: Any, n_ctx: int | None = None, tl_config: str | None = None
) -> Any:
    """Convert a loaded transformers causal LM into an unprocessed HookedTransformer.

    `tl_config`: a TransformerLens model name whose built-in config describes this
    architecture (needed where its local-config path does not know it, e.g. Gemma 3);
    the weights are always `hf_model`'s own, nothing is fetched."""
    from transformer_lens import loading_from_pretrained as loading

    hf_config = _plain_hf_config(hf_model)
    cfg = _tl_config(hf_config, n_ctx, tl_config)
    with _tl_name(hf_config, tl_config) as name:
        state_dict = loading.get_pretrained_state_dict(name, cfg, hf_model, dtype=torch.float32)
    model = _hooked(cfg, tokenizer)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model

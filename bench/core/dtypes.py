"""The floating-point types featbench accepts by name, in one place: model weights
(`dtype`), cached activations (`activations.dtype`) and the hf_chat judge (`judge.dtype`)
all read this map, so a name is valid in one place exactly when it is in all."""

from __future__ import annotations

import torch

from bench.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; a ConfigError naming `key` and the choices otherwise."""
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r} is not allowed; choose one of {list(DTYPES)}")
    return DTYPES[name]

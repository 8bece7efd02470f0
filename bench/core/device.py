"""The device a job runs on: `device=auto` resolved once, so a CPU result is never taken
for a GPU run's (the config hash holds the resolved device)."""

from __future__ import annotations

import torch

from bench.errors import ModelUnavailable


def resolve_device(device: str) -> str:
    """`auto`: cuda when torch sees a GPU, else cpu; `cuda` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(
            "device=cuda but torch sees no CUDA device; use device=auto or device=cpu"
        )
    return device

"""What a job is, and its randomness: its resolved config and setting with their hashes
(`job_identity`), and torch's global generators seeded for the job (`seeded`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bench.core.device import resolve_device
from bench.errors import ConfigError
from bench.results import config_hash, setting_hash, setting_of


class Identity(NamedTuple):
    """What a job is: its resolved config, its setting (the config without the seed,
    as flat keys) and their hashes."""

    config: dict
    setting: dict
    config_hash: str
    setting_hash: str


def job_identity(cfg: DictConfig) -> Identity:
    """The job's identity, with `device=auto` resolved to the device actually used (so a
    CPU result is never taken for a GPU run's). The setting is the config without its
    `seed`, the run's one seed: a value that interpolates it (`${seed}`) is refused, since it
    would make every seed a setting of its own; methods get the seed from the job."""
    interpolating = _interpolating_seed(OmegaConf.to_container(cfg, resolve=False))
    if interpolating:
        raise ConfigError(
            f"{', '.join(interpolating)} interpolate the run's seed (${{seed}}): each seed would "
            "be a setting of its own. Leave the key out: the job hands the run's seed to the "
            "method (Method.seeded) and to every task (TaskData.seed)"
        )
    with open_dict(cfg):
        cfg.device = resolve_device(cfg.device)
    container = OmegaConf.to_container(cfg, resolve=True)
    return Identity(
        container, setting_of(container), config_hash(container), setting_hash(container)
    )


def _interpolating_seed(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose unresolved value mentions `${seed}` (Hydra's own node left out)."""
    if isinstance(node, dict):
        return [
            key
            for k, v in node.items()
            if not (not prefix and k == "hydra")
            for key in _interpolating_seed(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(node, list):
        return [key for i, v in enumerate(node) for key in _interpolating_seed(v, f"{prefix}[{i}]")]
    return [prefix] if isinstance(node, str) and "${seed}" in node else []


@contextmanager
def seeded(seed: int, device: str) -> Iterator[None]:
    """torch's global random generators seeded with `seed` for the block, then put back.

    Inside, a job draws what `torch.manual_seed(seed)` would give it (methods or tasks
    that call `torch.randn` without a generator rely on that, and results stay those of
    a process-wide seed); after it, the caller's random state is as it was (the next job
    of a sweep, a notebook, a test). A CPU job seeds only the CPU generator, so a GPU the
    job never uses is neither initialised nor reseeded; a CUDA job seeds and restores
    every visible GPU's, as `torch.manual_seed` seeds them all. Other accelerators (MPS)
    are seeded as `torch.manual_seed` does but not restored: torch has no fork for them.
    """
    kind = str(device).split(":", 1)[0]
    gpus = list(range(torch.cuda.device_count())) if kind == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"):
        if kind == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        yield

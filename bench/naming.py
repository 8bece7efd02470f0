"""Folder names of sweeps and jobs, from their command-line overrides.

A sweep's folder under `results/multirun/` is its overrides, sorted, so running
the same sweep again finds its finished jobs; a job's subfolder is its own
overrides. `conf/config.yaml` uses them through the resolvers `fb_sweep_name`
and `fb_job_name`, registered when this module is imported (by `bench.run`).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from omegaconf import OmegaConf

from bench.secrets import redact_text
from bench.storage import sha256_json

# Overrides that do not change what a job computes: they neither name the sweep's
# folder nor the job's (a re-run with force=true or another logger finds the same jobs).
NOT_IN_NAMES = ("force", "logger", "paths")


def _keep(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return not any(
        key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NOT_IN_NAMES
    )


def _slug(text: str, limit: int = 100) -> str:
    """A folder name from override text, secrets redacted first (bench.secrets): path
    separators and odd characters become '-', and a long name keeps its start plus a hash
    of the (redacted) whole."""
    text = redact_text(text)
    slug = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "-", text)
    return slug if len(slug) <= limit else f"{slug[: limit - 17]}-{sha256_json(text)[:16]}"


def sweep_name() -> str:
    """The sweep's folder under results/multirun/: its command-line overrides,
    sorted, so running the same sweep again finds its finished jobs.

    Read from the command line when the sweep's own config is first resolved,
    and cached: Hydra copies the resolver cache into every job's config (as it
    does for `${now:...}`), so all jobs of a sweep, in any launcher's worker
    processes, share the folder.
    """
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    kept = sorted(o for o in overrides if _keep(o) and not o.lstrip("+~").startswith("hydra"))
    return _slug("__".join(kept)) if kept else "default"


def job_name(overrides: Any) -> str:
    """A job's folder inside its sweep: the overrides that make it this job, sorted."""
    kept = sorted(str(o) for o in (overrides or []) if _keep(str(o)))
    return _slug(",".join(kept)) if kept else "defaults"


OmegaConf.register_new_resolver("fb_sweep_name", sweep_name, replace=True, use_cache=True)
OmegaConf.register_new_resolver("fb_job_name", job_name, replace=True)

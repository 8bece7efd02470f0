"""Folder names of sweeps and jobs, from their command-line overrides.

A sweep's folder under `results/multirun/` is its overrides, sorted, so running
the same sweep again finds its finished jobs; a job's subfolder is its own
overrides. `conf/config.yaml` uses them through the OmegaConf resolvers
`fb_sweep_name` and `fb_job_name`:

    sweep.dir:    ${paths.results_dir}/multirun/${fb_sweep_name:${hydra.overrides.task}}
    sweep.subdir: ${fb_job_name:${hydra.overrides.task}}

Importing this module registers nothing. `register_resolvers()` does, and the entry
point calls it before Hydra composes (`bench.cli.featbench`; tests through `tests/conftest.py`).
It must run in every process that resolves a job's config: a launcher's worker
processes (joblib, submitit) import `bench.cli.featbench` to unpickle the task function, so the
entry module registers them when it is imported.

Where a sweep's name comes from: the overrides Hydra hands the resolver, never
`sys.argv`. In a sweep's own (master) config `hydra.overrides.task` is the command
line's overrides as typed (`method=snmf,topk_sae`); in each job's config it is that
job's (`method=snmf`). `fb_sweep_name` is cached (`use_cache=True`), and OmegaConf keys
the cache by the argument's text (`${hydra.overrides.task}`), not by its value: the
master config resolves it first (Hydra makes the sweep folder before any job), and
Hydra copies the master's resolver cache into every job's config
(`ConfigLoader.load_sweep_config`, as for `${now:...}`; the cache travels with the
pickled config to a launcher's workers), so every job reads the sweep's folder, not a
name built from its own overrides.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

from bench.core.secrets import redact_text
from bench.core.storage import sha256_json

# Overrides that do not change what a job computes: they neither name the sweep's
# folder nor the job's (a re-run with force=true or another logger finds the same jobs).
NOT_IN_NAMES = ("force", "logger", "paths")


def _keep(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return not any(
        key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NOT_IN_NAMES
    )


def _slug(text: str, limit: int = 100) -> str:
    """A folder name from override text, secrets redacted first (bench.core.secrets): path
    separators and odd characters become '-', and a long name keeps its start plus a hash
    of the (redacted) whole."""
    text = redact_text(text)
    slug = re.sub(r"[^A-Za-z0-9=,._+\-\[\]]", "-", text)
    return slug if len(slug) <= limit else f"{slug[: limit - 17]}-{sha256_json(text)[:16]}"


def sweep_name(overrides: Any) -> str:
    """The sweep's folder under results/multirun/: its command-line overrides (the
    master config's `hydra.overrides.task`), sorted, so running the same sweep again
    finds its finished jobs. Overrides of Hydra itself never reach this list (Hydra keeps
    them in `hydra.overrides.hydra`); one that did would be left out here too."""
    texts = [str(o) for o in (overrides or [])]
    kept = sorted(o for o in texts if _keep(o) and not o.lstrip("+~").startswith("hydra"))
    return _slug("__".join(kept)) if kept else "default"


def job_name(overrides: Any) -> str:
    """A job's folder inside its sweep: the overrides that make it this job, sorted."""
    kept = sorted(str(o) for o in (overrides or []) if _keep(str(o)))
    return _slug(",".join(kept)) if kept else "defaults"


def register_resolvers() -> None:
    """Register `fb_sweep_name` and `fb_job_name` with OmegaConf (process-wide, as every
    OmegaConf resolver is). Idempotent: calling it again replaces them with the same
    functions. `fb_sweep_name` is cached (see the module's docstring for why)."""
    OmegaConf.register_new_resolver("fb_sweep_name", sweep_name, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("fb_job_name", job_name, replace=True)

"""Tidy results: one long-format row per measurement, with provenance.

A task returns rows as dicts holding its own dimensions (`feature`, `concept`,
`metric`, `value`, `kl_target`, `sign`, plus any extra columns such as
`reason` or `threshold`). `finalize` adds the run's columns (model, layer,
hook, method, task, seed, config hash, git commit, time) and `write_metrics`
stores the table atomically as `metrics.parquet`, with package versions in
the file's metadata.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench.errors import FeatbenchError
from bench.storage import atomic_write, sha256_json

log = logging.getLogger(__name__)

# The DESIGN.md row, in order, with its column types. Extra columns may follow.
SCHEMA = {
    "run_id": "string",
    "model": "string",
    "layer": "Int64",
    "hook": "string",
    "method": "string",
    "task": "string",
    "feature": "Int64",  # null on summary rows
    "concept": "string",
    "metric": "string",
    "value": "Float64",  # null = missing; `reason` says why
    "kl_target": "Float64",
    "sign": "Int64",
    "seed": "Int64",
    "config_hash": "string",
    "git_commit": "string",
    "created_at": "datetime64[ns, UTC]",
}
ROW_FIELDS = ("feature", "concept", "metric", "value", "kl_target", "sign")
RUN_FIELDS = ("run_id", "model", "layer", "hook", "method", "task", "seed", "config_hash")
PACKAGES = ("featbench", "torch", "transformer-lens", "sae-lens", "transformers", "numpy",
            "pandas", "pyarrow", "hydra-core", "wandb")  # fmt: skip
METRICS_FILE = "metrics.parquet"
FAILED_FILE = "failed.json"  # marks a sweep job that failed; the end-of-sweep callback counts them

# A name is secret when its last word is one of these (api_key, hf_token, client_secret,
# password, apikey); bos_token_id, max_new_tokens or token_position are not.
_SECRET_LAST_WORDS = {
    "key",
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "credentials",
    "authorization",
}
REDACTED = "***REDACTED***"


class ResultsError(FeatbenchError, OSError):
    """Results could not be written; what was there before is untouched."""


def is_secret_name(name: str) -> bool:
    """True for `api_key`, `hf_token`, `client_secret`, `password`, `WANDB_API_KEY`, ...:
    the name's last word is a secret word (`bos_token_id`, `max_new_tokens` are not)."""
    words = re.split(r"[_\-.]+", str(name).lower())
    return bool(words) and words[-1] in _SECRET_LAST_WORDS


def redact(obj: object) -> object:
    """Copy of a config tree with the values of secret-named keys replaced."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_name(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def config_hash(config: Mapping) -> str:
    """Hash of what determines a job's results (secrets, output paths, the logger
    and `force`, which only says whether to run again, excluded)."""
    relevant = {k: v for k, v in redact(config).items() if k not in ("paths", "logger", "force")}
    return sha256_json(relevant)[:16]


@cache
def git_commit() -> str:
    """The commit of featbench's source tree ("+dirty" when it has changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != here.parent:
            return "unknown"  # an installed copy inside some other repository
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=here, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def finalize(rows: Iterable[Mapping], run: Mapping) -> pd.DataFrame:
    """Tidy table of `rows` with the run's columns added, typed as SCHEMA."""
    missing = [f for f in RUN_FIELDS if f not in run]
    if missing:
        raise ValueError(f"run context lacks {missing}")
    records = []
    for row in rows:
        if "metric" not in row:
            raise ValueError(f"result row without a metric: {dict(row)}")
        record = {field: row.get(field) for field in ROW_FIELDS}
        record.update({k: v for k, v in row.items() if k not in ROW_FIELDS})
        clash = [k for k in RUN_FIELDS if k in row]
        if clash:
            raise ValueError(f"result row sets run-level columns {clash}: {dict(row)}")
        record.update({k: run[k] for k in RUN_FIELDS})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        frame = pd.DataFrame(columns=list(SCHEMA))
    frame["git_commit"] = git_commit()
    frame["created_at"] = pd.Timestamp(datetime.now(timezone.utc))
    if "reason" not in frame:
        frame["reason"] = None
    extras = [c for c in frame.columns if c not in SCHEMA]
    frame = frame[list(SCHEMA) + extras]
    return frame.astype({**SCHEMA, "reason": "string"})


def write_metrics(frame: pd.DataFrame, path: Path, metadata: Mapping | None = None) -> Path:
    """Write `frame` to `path` atomically, with package versions in the metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {
        b"featbench.versions": json.dumps(package_versions()).encode(),
        b"featbench.meta": json.dumps(dict(metadata or {}), default=str).encode(),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
    try:
        return atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))
    except OSError as err:
        raise ResultsError(
            f"cannot write results to {path}: {err.strerror or err}. "
            "Existing results there are untouched; choose another paths.results_dir or free space."
        ) from err


def read_metrics(path: Path) -> tuple[pd.DataFrame, dict]:
    """The table and its featbench metadata (`versions`, `meta`)."""
    table = pq.read_table(path)
    raw = table.schema.metadata or {}
    meta = {
        key.decode().removeprefix("featbench."): json.loads(value)
        for key, value in raw.items()
        if key.startswith(b"featbench.")
    }
    return table.to_pandas(), meta

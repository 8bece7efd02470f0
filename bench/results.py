"""Tidy results: one long-format row per measurement, with provenance.

A task returns rows as dicts holding its own dimensions (`feature`, `concept`,
`metric`, `value`, `kl_target`, `sign`, plus any extra columns such as
`reason` or `threshold`). `finalize` adds the run's columns (model, layer,
hook, method, task, seed and the provenance: config hash, setting hash, code
version, dataset hash, time) and `write_metrics` stores the table atomically
as `metrics.parquet`, with package versions in the file's metadata.

A summary row may carry the bootstrap `replicates` of its statistic (see
`bench.stats.Estimate`). They are not tidy columns: `pop_replicates` takes
them off the rows, each row keeps a `replicates_id`, and `write_replicates`
stores them beside the metrics as `replicates.parquet`, where the report
finds them to compute paired differences between methods.

Provenance:
- `config_hash`: the whole resolved config (device resolved) minus secrets,
  output paths, the logger and `force`;
- `setting_hash`: the same without the run's seed (the config's only seed), so jobs
  that differ only by seed share it (a report cell averages over seeds only);
- `code_digest`: the code identity, a digest of what computes results (the packages'
  Python sources, shipped configs and shipped data; not the report, which is rebuilt
  from the metrics). A finished job is reused only by code with the same digest, so a
  commit that touches docs, tests, the README or `results/` keeps finished jobs, and an
  installed copy of other code never passes for this one;
- `code_version`: the human-readable version, featbench's version plus the git commit
  and a hash of the uncommitted changes when run from a checkout (`featbench
  0.1.0+g<commit>`): who computed the row, not whether it is reused;
- `dataset_hash`: the dataset's sentences and labels; `dataset_version` its name
  (`concepts-v2` for the shipped one).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import platform
import subprocess
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bench.core.secrets import redact
from bench.core.storage import atomic_write, sha256_json
from bench.errors import FeatbenchError

log = logging.getLogger(__name__)

# The results row (docs/results.md, "Results schema"), in order, with its column types.
# Extra columns may follow.
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
    "setting_hash": "string",
    "code_version": "string",
    "code_digest": "string",
    "dataset_hash": "string",
    "dataset_version": "string",
    "created_at": "datetime64[ns, UTC]",
}
ROW_FIELDS = ("feature", "concept", "metric", "value", "kl_target", "sign")
#: the task columns that tell apart summary rows of one task and metric (besides the run's):
#: the report's cells, the W&B summary keys and the printed headline all split by these
SUMMARY_DIMENSIONS = ("encoder", "protocol", "description", "generator", "noise")
RUN_FIELDS = ("run_id", "model", "layer", "hook", "method", "task", "seed", "config_hash",
              "setting_hash", "code_version", "code_digest", "dataset_hash",
              "dataset_version")  # fmt: skip
PACKAGES = ("featbench", "torch", "transformer-lens", "sae-lens", "transformers", "numpy",
            "pandas", "pyarrow", "hydra-core", "wandb")  # fmt: skip
METRICS_FILE = "metrics.parquet"
REPLICATES_FILE = "replicates.parquet"  # bootstrap replicates of the summary rows, by replicates_id
# Config keys that never change what a job computes (output places, the tracker, whether
# to rerun), and the seed, which only a setting leaves out.
NOT_COMPUTED = ("paths", "logger", "force", "hydra")
# the value older code gave the run's seed in a setting it resolved with a placeholder (the
# report drops such keys from old jobs' settings, so old and new jobs share cells)
LEGACY_SEED = "<seed>"
FAILED_FILE = "failed.json"  # marks a sweep job that failed; the end-of-sweep callback counts them
# in the sweep folder: the failure records of jobs whose own folder refused failed.json
FAILED_LEDGER = ".featbench-failed"


class ResultsError(FeatbenchError, OSError):
    """Results could not be written; what was there before is untouched. `rescued`: the
    folder the finished results were saved to instead, when there is one."""

    def __init__(self, message: str, rescued: Path | None = None) -> None:
        super().__init__(message)
        self.rescued = rescued


def config_hash(config: Mapping) -> str:
    """Hash of what determines a job's results (secrets, output paths, the logger
    and `force`, which only says whether to run again, excluded). The caller
    resolves `device=auto` first, so a CPU result is never reused for a GPU run."""
    relevant = {k: v for k, v in redact(config).items() if k not in NOT_COMPUTED}
    return sha256_json(relevant)[:16]


def setting_of(config: Mapping) -> dict[str, Any]:
    """A job's setting: its config as flat dotted keys, secrets redacted, without the
    seed and what `config_hash` leaves out. Two jobs that differ only by seed have
    the same setting; the report names cells by the keys that vary between settings.

    The run's `seed` is the only seed a config holds (methods get it from the job,
    `Method.seeded`, and no value interpolates it: `bench.job.identity.job_identity` refuses
    `${seed}`), so leaving out that one key leaves out every trace of it."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = list(node) if isinstance(node, tuple) else node

    walk("", {k: v for k, v in redact(config).items() if k not in (*NOT_COMPUTED, "seed")})
    return dict(sorted(flat.items()))


def setting_hash(config: Mapping) -> str:
    """Hash of `setting_of(config)`: the report's cell key (seeds are averaged within it)."""
    return sha256_json(setting_of(config))[:16]


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@cache
def code_version() -> str:
    """featbench's version, e.g. `featbench 0.1.0+g7ec37fb` from a clean checkout,
    `featbench 0.1.0+g7ec37fb.dirty-1a2b3c4d` with uncommitted changes (the suffix
    hashes the diff and the untracked files' names, so two different edits of one
    commit are two versions; the committed results folders do not count, see
    `uncommitted`), and `featbench 0.1.0` for an installed copy.

    Computed once per process: a job's rows all name the code that started it."""
    try:
        version = importlib.metadata.version("featbench")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    here = Path(__file__).resolve().parent
    top = _git("rev-parse", "--show-toplevel", cwd=here)
    if top is None or Path(top.strip()).resolve() != here.parent:
        return f"featbench {version}"  # an installed copy, or inside some other repository
    commit = _git("rev-parse", "HEAD", cwd=here)
    if not commit:
        return f"featbench {version}"
    text = f"featbench {version}+g{commit.strip()[:12]}"
    changes = uncommitted(here)
    return text + (f".dirty-{changes}" if changes else "")


#: the checkout's folders of committed outputs: a sweep into one rewrites its files (Hydra's
#: multirun.yaml first of all) before the first job asks for the code version
OUTPUT_FOLDERS = ("results",)


def uncommitted(inside: Path) -> str | None:
    """A digest of the checkout's uncommitted changes, the one `inside` is in: the diff
    against HEAD and the untracked files' names over the whole work tree (not only below
    `inside`), OUTPUT_FOLDERS left out; None when there are none (or no git)."""
    where = ["--", ":(top)", *(f":(top,exclude){name}" for name in OUTPUT_FOLDERS)]
    diff = _git("diff", "HEAD", "--binary", *where, cwd=inside) or ""
    untracked = _git("ls-files", "--others", "--exclude-standard", *where, cwd=inside) or ""
    if not (diff or untracked):
        return None
    return hashlib.sha256((diff + "\0" + untracked).encode()).hexdigest()[:8]


#: the packages whose files compute a job's results, by import name
COMPUTING = ("bench", "bench.conf", "featbench.methods", "featbench.tasks")
#: packages inside those that only read finished results (the report is rebuilt from the
#: metrics on every run; bench.reference holds the paper's published numbers for it)
READING = ("bench.report", "bench.reference")
#: the files that count: sources, shipped configs and shipped data
DIGESTED_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".jsonl", ".csv")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    places = list(spec.submodule_search_locations or []) if spec else []
    return Path(places[0]).resolve() if places else None


@cache
def code_digest() -> str:
    """The code identity: a digest of every source, config and data file of COMPUTING (by
    package and relative path, so the same code digests the same in a checkout and in an
    installed copy), READING left out. Computed once per process."""
    dirs = {name: _package_dir(name) for name in (*COMPUTING, *READING)}
    for name in READING:  # a data-only folder may not import as a package: find it by place
        parent, _, leaf = name.rpartition(".")
        if dirs[name] is None and dirs.get(parent) is not None:
            dirs[name] = dirs[parent] / leaf
    own = {d.resolve(): name for name, d in dirs.items() if d is not None}
    files: dict[str, Path] = {}  # "package:relative path" -> file, each file once
    for name in COMPUTING:
        if dirs[name] is None:
            continue
        for path in dirs[name].rglob("*"):
            real = path.resolve()
            if real.suffix not in DIGESTED_SUFFIXES or "__pycache__" in real.parts:
                continue
            # a file belongs to its nearest package folder: bench.conf's YAML is hashed once,
            # under bench.conf, whether conf/ sits beside bench/ or inside it
            home = next((p for p in real.parents if p in own), None)
            if home is None or own[home] in READING or not real.is_file():
                continue
            files[f"{own[home]}:{real.relative_to(home).as_posix()}"] = real
    digest = hashlib.sha256()
    for key in sorted(files):
        digest.update(key.encode() + b"\0" + files[key].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


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
    frame["created_at"] = pd.Timestamp(datetime.now(timezone.utc))
    if "reason" not in frame:
        frame["reason"] = None
    extras = [c for c in frame.columns if c not in SCHEMA]
    frame = frame[list(SCHEMA) + extras]
    return frame.astype({**SCHEMA, "reason": "string"})


def pop_replicates(rows: list[dict], prefix: str) -> dict[str, np.ndarray]:
    """Take the `replicates` array off every row that has one; such a row gets
    `replicates_id` = `<prefix>:<i>`. Returns {replicates_id: array}."""
    found: dict[str, np.ndarray] = {}
    for row in rows:
        values = row.pop("replicates", None)
        if values is None:
            continue
        key = f"{prefix}:{len(found)}"
        found[key] = np.asarray(values, dtype=float)
        row["replicates_id"] = key
    return found


def write_replicates(path: Path, replicates: Mapping[str, np.ndarray]) -> Path | None:
    """Store {replicates_id: array} atomically as a long table (replicates_id,
    replicate, value); None (and nothing written) when there are none."""
    if not replicates:
        return None
    ids = [key for key, values in replicates.items() for _ in range(len(values))]
    index = np.concatenate([np.arange(len(v)) for v in replicates.values()])
    values = np.concatenate([np.asarray(v, dtype=float) for v in replicates.values()])
    table = pa.table({"replicates_id": ids, "replicate": index, "value": values})
    try:
        return atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))
    except OSError as err:
        raise ResultsError(f"cannot write {path}: {err.strerror or err}") from err


def read_replicates(job_dir: Path) -> dict[str, np.ndarray]:
    """A job's {replicates_id: array}; {} when it has no replicates file."""
    path = Path(job_dir) / REPLICATES_FILE
    if not path.is_file():
        return {}
    frame = pq.read_table(path).to_pandas()
    return {
        str(key): group.sort_values("replicate")["value"].to_numpy(dtype=float)
        for key, group in frame.groupby("replicates_id", sort=False)
    }


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

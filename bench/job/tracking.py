"""Experiment tracking side channel (Weights & Biases).

`metrics.parquet` stays the source of truth: a tracker only mirrors a job's
config, its summary metrics, its per-feature rows and its plots into a tool
built for browsing many runs. A tracker failure after construction is logged
as a warning and never fails the job.

`WandbLogger` defaults to W&B's offline mode: no account, no key and no
network; runs land in `<job_dir>/wandb/offline-run-*/`. `logger.mode=online` uploads
live with the user's own credentials (WANDB_API_KEY or a `wandb login` netrc entry).

Finished and unfinished runs: a run that featbench closed gets `featbench-finished.json`
in its folder, written after W&B's `finish` returns. A job killed mid-run (SIGKILL, the
OOM killer, a cluster's time limit) leaves a W&B folder without it: a partial run that
`wandb sync` would upload as if it were a result. `featbench-wandb-sync DIR...`
(bench.cli.wandb_sync) uploads only the finished offline runs under DIR and names the others;
the same by hand:

    wandb sync $(find DIR -path '*/offline-run-*/featbench-finished.json' -printf '%h ')

Process-wide state: W&B's service process starts with the first run of a process and
serves every later one; it reads `WANDB_ERROR_REPORTING` when it starts. Offline runs
set that variable to `false` only while W&B is called (`_quiet`) and put it back, so the
process's environment is the caller's again afterwards. W&B itself sets `WANDB_SERVICE`
(the service's address, for child processes) for the rest of the process: its own state,
left alone.

Secrets: the config is redacted (`bench.core.secrets.redact`) before it reaches
W&B; W&B's system metadata (which records the command line, where a Hydra
override such as `judge.api_key=...` would sit) is switched off; environment
variables are never logged.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from bench.core.secrets import redact
from bench.core.storage import atomic_write_text
from bench.errors import ConfigError
from bench.results import SUMMARY_DIMENSIONS

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
# W&B renders tables of this size comfortably; metrics.parquet keeps every row.
MAX_TABLE_ROWS = 20_000
# Dimensions that tell apart summary rows of one task and metric: the task's own (the
# encoder, the steering protocol, ...) and steering's grid.
_KEY_DIMENSIONS = (*SUMMARY_DIMENSIONS, "kl_target", "sign")
_DEFAULT_HOST = "https://api.wandb.ai"  # W&B's own server, used when WANDB_BASE_URL is unset
# Written into a W&B run's folder once featbench has closed the run: its absence marks a
# partial run (the job was killed), which `featbench-wandb-sync` never uploads.
FINISHED_MARKER = "featbench-finished.json"
# wandb-core's error reporting looks up its server even offline; the service reads this
# variable when it starts (inside the first `wandb.init` of a process).
ERROR_REPORTING_ENV = "WANDB_ERROR_REPORTING"


@contextmanager
def scoped_env(name: str, value: str) -> Iterator[None]:
    """`os.environ[name] = value` for the block only; the old value (or its absence) is put
    back after it, also when the block raises."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class Tracker(ABC):
    """Side-channel experiment logger; metrics.parquet stays the source of truth."""

    @abstractmethod
    def start(self, config: dict, job_dir: Path, group: str, name: str) -> None:
        """Open a run for one job. `config` is redacted again here, defensively."""

    @abstractmethod
    def log_results(self, frame: pd.DataFrame, plots: list[Path]) -> None:
        """Mirror the job's tidy metrics table (bench/results.py SCHEMA + extras) and plots."""

    @abstractmethod
    def finish(self, failed: bool) -> None:
        """Close the run. Safe without (or after a failed) `start`; idempotent; never raises."""


class WandbLogger(Tracker):
    """Weights & Biases tracker: one W&B run per featbench job.

    Args:
        mode: "offline" (default: local files only, no account, no network),
            "online" (uploads with the user's own credentials) or "disabled"
            (W&B's no-op run).
        project: W&B project the runs belong to.
        entity: W&B user or team; None = the account's default entity.
        tags: labels attached to every run.
        dir: where W&B writes its run folders; None = each job's own folder.
    """

    def __init__(
        self,
        mode: str = "offline",
        project: str = "featbench",
        entity: str | None = None,
        tags: list[str] | None = None,
        dir: str | None = None,  # the W&B name for it (shadows the builtin only here)
    ) -> None:
        if mode not in MODES:
            raise ConfigError(
                f"logger.mode={mode!r} is not a W&B mode featbench supports; "
                f"allowed: {', '.join(MODES)}"
            )
        self.mode = mode
        self.project = str(project)
        self.entity = None if entity is None else str(entity)
        self.tags = [str(tag) for tag in (tags or [])]
        self.dir = None if dir is None else str(dir)
        self._run: Any = None
        self._run_dir: Path | None = None  # the open run's W&B folder (gets FINISHED_MARKER)
        if mode == "online":
            _require_credentials()

    def _quiet(self) -> Any:
        """The scope of a call into W&B: offline (and disabled) runs turn W&B's error
        reporting off for the call only; online runs leave the user's setting alone."""
        return nullcontext() if self.mode == "online" else scoped_env(ERROR_REPORTING_ENV, "false")

    def start(self, config: dict, job_dir: Path, group: str, name: str) -> None:
        if self._run is not None:
            log.warning("W&B run %s still open at start; finishing it first", self._run.id)
            self.finish(failed=False)
        if self.mode == "online":
            _require_credentials()
        import wandb

        clean = redact(_plain_config(config))
        root = Path(self.dir) if self.dir else Path(job_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(
                console="off",  # never wrap the job's stdout/stderr
                silent=True,  # featbench's own log says what happened
                x_disable_meta=True,  # metadata holds sys.argv: a secret given as an override
                x_disable_machine_info=True,  # same metadata record
                x_disable_stats=self.mode != "online",  # no system-metrics sampler offline
                disable_git=True,  # the config already carries the git commit
                save_code=False,  # the code is in git; never copy files into the run
            )
            with self._quiet():
                self._run = wandb.init(
                    mode=self.mode,
                    project=self.project,
                    entity=self.entity,
                    group=group,
                    name=name,
                    job_type="featbench",
                    tags=self.tags or None,
                    config=clean,
                    dir=str(root),
                    reinit="create_new",  # Hydra multirun: several jobs, one process
                    settings=settings,
                )
            self._run_dir = _run_folder(self._run)
        except Exception as err:  # the side channel never fails the job
            log.warning(
                "W&B run for %s did not start (%s: %s); continuing without W&B, "
                "metrics.parquet is unaffected",
                name,
                type(err).__name__,
                err,
            )
            self._run, self._run_dir = None, None
            return
        log.info("W&B %s run %s started under %s", self.mode, self._run.id, root / "wandb")

    def log_results(self, frame: pd.DataFrame, plots: list[Path]) -> None:
        run = self._run
        if run is None:
            log.debug("no W&B run open; results not mirrored")
            return
        try:
            summary, missing = summary_metrics(frame)
            summary["featbench/missing_summary_values"] = missing
            summary["featbench/rows"] = len(frame)
            with self._quiet():
                run.summary.update(summary)
        except Exception as err:
            log.warning("W&B summary not logged: %s", err, exc_info=True)
        payload: dict[str, Any] = {}
        try:
            import wandb

            if frame.empty:
                features, concepts = frame, frame
            else:
                features = frame[frame["feature"].notna()]
                concepts = frame[frame["feature"].isna() & frame["concept"].notna()]
            for key, part in (("features", features), ("concepts", concepts)):
                if len(part):
                    columns, rows = table_rows(part, key)
                    payload[key] = wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
            for path in plots:
                path = Path(path)
                if path.is_file():
                    payload[f"plots/{path.stem}"] = wandb.Image(str(path))
                else:
                    log.warning("plot %s not found; not sent to W&B", path)
            if payload:
                with self._quiet():
                    run.log(payload)
        except Exception as err:
            log.warning("W&B tables/plots not logged: %s", err, exc_info=True)

    def finish(self, failed: bool) -> None:
        run, self._run = self._run, None
        run_dir, self._run_dir = self._run_dir, None
        if run is None:
            return
        exit_code = 1 if failed else 0
        try:
            with self._quiet():
                run.finish(exit_code=exit_code)
        except Exception as err:
            log.warning("W&B run %s did not finish cleanly: %s", getattr(run, "id", "?"), err)
            return
        if run_dir is not None and run_dir.is_dir():
            try:
                record = {"run_id": getattr(run, "id", None), "exit_code": exit_code}
                atomic_write_text(run_dir / FINISHED_MARKER, json.dumps(record))
            except OSError as err:
                log.warning(
                    "W&B run %s: cannot mark it finished (%s); featbench-wandb-sync will skip it",
                    getattr(run, "id", "?"),
                    err,
                )


def _run_folder(run: Any) -> Path | None:
    """The folder W&B writes a run into (`<dir>/wandb/offline-run-*`), or None where the
    run has none (mode=disabled) or this W&B version does not say."""
    try:
        folder = Path(run.settings.sync_dir)
    except (AttributeError, TypeError):
        return None
    return folder if folder.is_dir() else None


def summary_metrics(frame: pd.DataFrame) -> tuple[dict[str, float], int]:
    """Summary rows (feature and concept null) as `{"<task>/<metric>": value}`.

    Adds "/ci_low" and "/ci_high" entries where those columns hold values, and
    qualifies the key with every dimension a row sets (e.g.
    "concept_detection/mean_feature_auroc[encoder=native]",
    "steering/score[kl_target=0.5,sign=1]"). Missing values are skipped and
    counted (second element); a repeated key keeps its first value.
    """
    out: dict[str, float] = {}
    missing = 0
    if frame.empty:
        return out, missing
    rows = frame[frame["feature"].isna() & frame["concept"].isna()]
    for row in rows.to_dict("records"):
        key = f"{row['task']}/{row['metric']}"
        dims = [
            f"{d}={_plain(row.get(d))}" for d in _KEY_DIMENSIONS if _plain(row.get(d)) is not None
        ]
        if dims:
            key += f"[{','.join(dims)}]"
        value = _number(row.get("value"))
        if value is None:
            missing += 1
            continue
        if key in out:
            log.warning("summary metric %s appears twice; W&B keeps the first", key)
            continue
        out[key] = value
        for bound in ("ci_low", "ci_high"):
            limit = _number(row.get(bound))
            if limit is not None:
                out[f"{key}/{bound}"] = limit
    return out, missing


def table_rows(frame: pd.DataFrame, name: str = "table") -> tuple[list[str], list[list]]:
    """Columns and rows of plain str/int/float/bool/None values (NA and NaN -> None),
    at most MAX_TABLE_ROWS rows (a warning says when rows were left out)."""
    if len(frame) > MAX_TABLE_ROWS:
        log.warning(
            "W&B table %s keeps the first %d of %d rows; metrics.parquet has them all",
            name,
            MAX_TABLE_ROWS,
            len(frame),
        )
        frame = frame.iloc[:MAX_TABLE_ROWS]
    columns = [str(c) for c in frame.columns]
    rows = [[_plain(v) for v in record] for record in frame.itertuples(index=False, name=None)]
    return columns, rows


def _plain(value: object) -> str | int | float | bool | None:
    """A JSON-plain copy of one cell: NA/NaN -> None, numpy scalars -> Python, rest -> str."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):  # numpy.float64 included: a float subclass
        return None if math.isnan(value) else float(value)
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalar
        return _plain(value.item())
    return str(value)


def _number(value: object) -> float | None:
    plain = _plain(value)
    if isinstance(plain, bool) or not isinstance(plain, int | float):
        return None
    out = float(plain)
    return None if math.isinf(out) else out


def _plain_config(config: object) -> object:
    """Plain containers from an OmegaConf config (so redaction sees every level)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - hydra depends on omegaconf
        return config
    if OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {k: _plain_config(v) for k, v in config.items()}
    return config


def _require_credentials() -> None:
    """Online mode needs the user's own W&B credentials; say which, before W&B prompts."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_HOST).netloc
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (netrc.NetrcParseError, OSError) as err:
        log.warning("cannot read %s for W&B credentials: %s", path, err)
        entry = None
    if entry and entry[2]:
        return
    raise ConfigError(
        "logger.mode=online needs W&B credentials: set WANDB_API_KEY (or run `wandb login`, "
        f"which stores a key for {host} in {path}); logger.mode=offline needs none and "
        "`featbench-wandb-sync DIR` uploads its finished offline runs later"
    )

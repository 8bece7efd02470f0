"""The `featbench` command: Hydra around `bench.job.run.run_job`.

    featbench                                  # the defaults (conf/config.yaml)
    featbench experiment=smoke                 # a small end-to-end run
    featbench -m method=diffmean layer=3,6     # a sweep (Hydra multirun)
    featbench --cfg job                        # print the composed config

Exit codes: 0 success; 2 an error the user can fix (configuration, data, a secret on the
command line, a folder that refuses a write), shown as one line; 1 a bug, with its
traceback. In a sweep a failing job does not stop the others: its folder gets
`failed.json` and the end-of-sweep callback exits with the worst code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bench.cli.naming import register_resolvers
from bench.core.secrets import is_secret_name, looks_like_secret, redact_text
from bench.core.storage import atomic_write_text
from bench.errors import FeatbenchError, SweepFailed, error_line
from bench.job.config import register_schema
from bench.job.run import run_job
from bench.results import FAILED_FILE, FAILED_LEDGER, SUMMARY_DIMENSIONS

log = logging.getLogger(__name__)

# The one place featbench changes Hydra's and OmegaConf's process-wide registries: this is
# the entry module, and a launcher's worker processes import it to unpickle the job, so
# they register the typed schema and the folder-name resolvers too (both idempotent).
register_schema()
register_resolvers()

# Errors a user can fix: shown as one line, no traceback (anything else is a bug).
USER_ERRORS = (FeatbenchError, FloatingPointError)
# A file system that refuses a write (permissions, read-only, full, a file where a folder
# should be) is the user's to fix too: one line naming the path, exit code 2.
DISK_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
               errno.ENOTDIR, errno.EEXIST)  # fmt: skip


def disk_error(err: BaseException) -> str | None:
    """`cannot write PATH: REASON` for an OSError of a refused write, else None."""
    if isinstance(err, OSError) and err.errno in DISK_ERRORS and err.filename:
        return f"cannot write {err.filename}: {err.strerror}"
    return None


@hydra.main(version_base="1.3", config_path="pkg://bench.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        try:
            frame = run_job(cfg, job_dir)
        except USER_ERRORS as err:
            log.error("%s", err)
            sys.exit(2)
        except OSError as err:
            if (why := disk_error(err)) is None:
                raise
            log.error("%s", why)
            sys.exit(2)
        log.info("results in %s\n%s", job_dir, headline(frame))
        return
    # In a sweep a failing job must not stop the others: the error is logged
    # (with its traceback when it is a bug), the job folder gets `failed.json`,
    # and the end-of-sweep callback reports the failures and sets the exit code.
    group = Path(hydra_cfg.sweep.dir).name
    try:
        frame = run_job(cfg, job_dir, group=group, name=job_dir.name)
    except USER_ERRORS as err:
        log.error("job %s: %s", job_dir.name, error_line(err))
        _mark_failed(job_dir, err, exit_code=2)
        return
    except Exception as err:
        if (why := disk_error(err)) is not None:
            log.error("job %s: %s", job_dir.name, why)
            _mark_failed(job_dir, err, exit_code=2)
            return
        log.exception("job %s failed", job_dir.name)
        _mark_failed(job_dir, err, exit_code=1)
        return
    log.info("job %s done: %s\n%s", job_dir.name, job_dir, headline(frame))


def _mark_failed(job_dir: Path, err: BaseException, exit_code: int) -> None:
    """Record the failure for the end-of-sweep callback: `failed.json` in the job's folder;
    where that folder takes no file (the failure itself may be a folder that refuses
    writes), a record in the sweep folder's ledger (`FAILED_LEDGER`) instead. A job whose
    results were rescued to another folder gets the record there too. A failure that can
    be recorded nowhere is raised, so the sweep still ends non-zero."""
    record = {"error": redact_text(error_line(err)), "exit_code": exit_code, "job": str(job_dir)}
    rescued = getattr(err, "rescued", None)
    if rescued is not None:
        record["rescued"] = str(rescued)
        _try_write(Path(rescued) / FAILED_FILE, record)
    if _try_write(job_dir / FAILED_FILE, record):
        return
    ledger = Path(HydraConfig.get().sweep.dir) / FAILED_LEDGER / f"{job_dir.name}.json"
    log.error(
        "job %s: cannot record the failure in %s; recording it in %s",
        job_dir.name,
        job_dir / FAILED_FILE,
        ledger,
    )
    if not _try_write(ledger, record):
        raise RuntimeError(
            f"job {job_dir.name} failed ({record['error']}) and the failure could not be "
            f"recorded in {job_dir} nor in {ledger.parent}"
        ) from err


def _try_write(path: Path, record: dict) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record))
    except OSError:
        return False
    return True


def secret_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that put a secret in a literal value: a secret-named key
    (`judge.api_key=...`), a value that looks like a key (`judge.api_key_env=sk-...`, a
    plausible slip), or a URL with credentials in it (`https://user:key@host/v1`).

    Hydra writes the command line to disk (multirun.yaml) and to its logs, so a secret
    given there would leak; `${oc.env:NAME}` keeps it in the environment, where it belongs.
    """
    found = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or value.strip().startswith("${"):
            continue
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        if is_secret_name(name) or looks_like_secret(value):
            found.append(key)
    return found


def cli() -> None:
    """Console-script entry point."""
    leaked = secret_overrides(sys.argv[1:])
    if leaked:
        sys.stderr.write(
            f"featbench: {', '.join(leaked)} set on the command line to a secret (a key, a "
            "token, or a URL with credentials); Hydra would save it in its logs and sweep "
            "files. Keep it in an environment variable: name the variable where a key is "
            "read (e.g. 'judge.api_key_env=OPENAI_API_KEY'), or interpolate it "
            "(e.g. 'judge.base_url=${oc.env:JUDGE_URL}').\n"
        )
        sys.exit(2)
    sys.exit(run_main())


def _options_of(err: BaseException) -> str:
    """The options of the config group a missing config belongs to, when Hydra's message
    does not list them itself (it lists them for `method=nonexistent`, not for an entry of
    a list such as `task=[nonexistent]`): the shipped YAMLs, and those of any
    `hydra.searchpath=[file://DIR]` folder on the command line."""
    from hydra.errors import MissingConfigException

    missing = getattr(err, "missing_cfg_file", None)
    if not isinstance(err, MissingConfigException) or err.options or not missing:
        return ""
    group = str(missing).rpartition("/")[0]
    if not group:
        return ""
    from importlib.resources import files

    names = {
        p.name.removesuffix(".yaml")
        for p in files("bench.conf").joinpath(group).iterdir()
        if p.name.endswith(".yaml")
    }
    for arg in sys.argv[1:]:
        if arg.startswith("hydra.searchpath="):
            for folder in arg.partition("=")[2].strip("[]").split(","):
                path = Path(folder.strip().removeprefix("file://")) / group
                names |= {p.stem for p in path.glob("*.yaml")}
    return f"\nAvailable options in '{group}': {', '.join(sorted(names))}" if names else ""


def run_main() -> int:
    """Run the Hydra app; a configuration error (a bad override, an unknown option or key, a
    value of the wrong type) is exit code 2 with Hydra's message, as featbench's own config
    checks are; exit code 1 stays for bugs, which keep their traceback.

    Hydra reports its own errors and exits 1; HYDRA_FULL_ERROR=1 makes it raise them
    instead, so it is set for the duration of the call (and restored): this is the entry
    point of the process, and the user's own HYDRA_FULL_ERROR=1 still gets the full trace.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    wanted = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except SweepFailed as failed:  # the end-of-sweep callback's verdict, already logged
        return failed.exit_code
    except (HydraException, OmegaConfBaseException) as err:
        if wanted == "1":
            raise
        cause = err.__cause__
        more = f"\n{cause}" if isinstance(cause, OmegaConfBaseException) else ""
        more += _options_of(err)
        sys.stderr.write(f"featbench: configuration error: {err}{more}\n")
        return 2
    except OSError as err:  # e.g. a read-only results folder, refused by Hydra's mkdir
        if (why := disk_error(err)) is None:
            raise
        sys.stderr.write(f"featbench: {why}; choose another paths.results_dir or free space\n")
        return 2
    finally:
        if wanted is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = wanted
    return 0


def headline(frame: pd.DataFrame) -> str:
    """The job's summary rows (no feature, no concept) as text: one block per task,
    one line per metric (and its dimensions where the task has them), with the
    95% interval where the task gives one."""
    summary = frame[frame["feature"].isna() & frame["concept"].isna()]
    if summary.empty:
        return "(no summary rows)"
    blocks = []
    for task, rows in summary.groupby("task", sort=False):
        dims = [c for c in SUMMARY_DIMENSIONS if c in rows and rows[c].notna().any()]
        lines = []
        for _, row in rows.iterrows():
            label = " ".join(str(row[c]) for c in ["metric", *dims] if pd.notna(row[c]))
            value = "missing" if pd.isna(row["value"]) else f"{row['value']:.4f}"
            if "ci_low" in row and pd.notna(row["ci_low"]):
                value += f"  [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            lines.append(f"  {label:<34} {value}")
        blocks.append(f"{task}\n" + "\n".join(lines))
    return "\n".join(blocks)


if __name__ == "__main__":
    cli()

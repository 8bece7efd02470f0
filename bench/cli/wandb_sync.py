"""`featbench-wandb-sync DIR...`: upload the finished offline W&B runs under DIR, never the
partial run of a job that was killed (its folder lacks bench.job.tracking.FINISHED_MARKER, which
the logger writes only after W&B's `finish` returned)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from bench.job.tracking import FINISHED_MARKER

log = logging.getLogger(__name__)

OFFLINE_RUN_GLOB = "offline-run-*"  # W&B's name for an offline run's folder under wandb/


def offline_runs(*roots: Path) -> tuple[list[Path], list[Path]]:
    """The offline W&B run folders under `roots` (searched recursively): those featbench
    finished (they hold FINISHED_MARKER) and those it did not (killed or still running)."""
    finished: list[Path] = []
    unfinished: list[Path] = []
    for root in roots:
        for folder in sorted(Path(root).rglob(OFFLINE_RUN_GLOB)):
            if folder.is_dir() and any(folder.glob("*.wandb")):
                (finished if (folder / FINISHED_MARKER).is_file() else unfinished).append(folder)
    return finished, unfinished


def cli(argv: list[str] | None = None) -> None:
    """Console-script entry point: `featbench-wandb-sync DIR... [-- WANDB-SYNC-OPTIONS]`.

    Runs `wandb sync` on the finished offline runs under each DIR, never on a partial
    one (a job killed mid-run); arguments after `--` go to `wandb sync` as they are
    (e.g. `-- -p myproject --dry-run`). Exit code: wandb's, or 2 for a DIR that does not
    exist.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="featbench-wandb-sync",
        description="Upload the finished offline W&B runs under DIR (wandb sync), never "
        "the partial runs of killed jobs. Arguments after -- go to wandb sync.",
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="job or sweep folders (searched recursively)"
    )
    parser.add_argument("--list", action="store_true", help="list the runs; upload nothing")
    args = parser.parse_args(ours)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        sys.stderr.write(f"featbench-wandb-sync: no such folder: {', '.join(missing)}\n")
        sys.exit(2)
    finished, unfinished = offline_runs(*args.dirs)
    for folder in unfinished:
        log.warning("skipped %s: a partial run (its job was killed, or is still running)", folder)
    if args.list:
        sys.stdout.write("".join(f"finished {f}\n" for f in finished))
        sys.stdout.write("".join(f"partial {f}\n" for f in unfinished))
        return
    if not finished:
        log.info(
            "no finished offline W&B run under %s; nothing to sync", ", ".join(map(str, args.dirs))
        )
        return
    command = [sys.executable, "-m", "wandb", "sync", *extra, *map(str, finished)]
    log.info("wandb sync: %d finished run(s), %d partial skipped", len(finished), len(unfinished))
    sys.exit(subprocess.run(command, check=False).returncode)

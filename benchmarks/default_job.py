"""The default featbench job's wall time and peak memory, by stage (not a test).

    python benchmarks/default_job.py [--methods diffmean] [--cache warm] [--json out.json]

Runs, per method, one job of the default configuration as a user would:

    featbench method=<m> hydra.mode=RUN 'task=[concept_detection,steering,reconstruction]'
        logger=none hydra.run.dir=<tmp>

in a fresh process:

- `--cache warm` (default): the usual cache (`FEATBENCH_CACHE` or
  ~/.cache/featbench); a priming job (same method, concept_detection only) runs
  first, so the timed job finds the converted model and the activations
  cached, as every run after a user's first does;
- `--cache cold`: `FEATBENCH_CACHE` points at a new empty folder (GGUF
  conversion and activation extraction included).

Per stage it reports the seconds and the peak resident memory so far that
`bench.cli.featbench` records in the metrics file's metadata (`meta["meta"]["stages"]`,
a list of {"stage", "seconds", "peak_rss_mb"}); for the whole job, the wall
time and peak RSS of the process measured from outside (`os.wait4`).
Extra Hydra overrides (`--override key=value`, repeatable) shrink the job for
quick checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.core.storage import cache_dir
from bench.results import read_metrics

TASKS = "task=[concept_detection,steering,reconstruction]"


def featbench(args: list[str], cache: Path, log: Path) -> dict:
    """Run featbench with `args`; wall seconds and peak RSS (MB) of the process."""
    env = {**os.environ, "FEATBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    script = Path(sys.executable).with_name("featbench")  # the console script, as users run it
    command = [str(script), *args] if script.exists() else [sys.executable, "-m", "bench", *args]
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"featbench {' '.join(args)} failed ({code}):\n{log.read_text()[-3000:]}")
    return {"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def job(method: str, cache_kind: str, overrides: list[str], work: Path) -> dict:
    cache = cache_dir() if cache_kind == "warm" else work / "cache"
    if cache_kind == "warm":
        prime = [f"method={method}", "hydra.mode=RUN", "task=[concept_detection]", "logger=none"]
        prime += [o for o in overrides if not o.startswith("task.")]  # same data, same cache key
        featbench([*prime, f"hydra.run.dir={work / 'prime'}"], cache, work / "prime.log")
    run_dir = work / "job"
    args = [f"method={method}", "hydra.mode=RUN", TASKS, "logger=none", *overrides]
    outside = featbench([*args, f"hydra.run.dir={run_dir}"], cache, work / "job.log")
    _, meta = read_metrics(run_dir / "metrics.parquet")
    info = meta.get("meta", {})
    stages = info.get("stages")
    if not stages:  # bench.cli.featbench without per-stage records: what it does record
        stages = [{"stage": "load_model", "seconds": info.get("model_load_seconds")}]
        stages.append({"stage": "(job total, in-process)", "seconds": info.get("seconds")})
    command = f"featbench {' '.join(args)} hydra.run.dir=<tmp>"
    return {
        "method": method,
        "cache": cache_kind,
        "command": command,
        "overrides": overrides,
        "stages": stages,
        **outside,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="diffmean", help="comma-separated method configs")
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    results = []
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory(prefix="featbench-job-") as work:
            result = job(method, args.cache, args.override, Path(work))
        results.append(result)
        print(f"# default job, method={method}, {args.cache} cache\n  {result['command']}")
        for stage in result["stages"]:
            rss = stage.get("peak_rss_mb")
            rss_text = f"{rss:8.0f} MB peak RSS so far" if rss is not None else ""
            print(f"  {stage['stage']:<28} {stage['seconds'] or 0:8.1f} s  {rss_text}")
        print(f"  {'whole process (outside)':<28} {result['wall_seconds']:8.1f} s  "
              f"{result['peak_rss_mb']:8.0f} MB peak RSS")  # fmt: skip

    if args.json:
        args.json.write_text(json.dumps({"jobs": results}, indent=1))


if __name__ == "__main__":
    main()

"""Embedded model load, cold against warm, each in a fresh process (not a test).

    python benchmarks/model_load.py [--repeats 2] [--json out.json]

`bench.models.load_model("smollm2-135m")` in a new Python process:

- cold: `FEATBENCH_CACHE` points at a new empty folder, so the GGUF file is
  read and dequantized by transformers and converted into a HookedTransformer,
  which is then written to the cache as safetensors + JSON;
- warm: a second process on the same folder, which reads that converted entry.

Each round uses its own fresh folder (cold, then warm); rounds alternate so that
load from other processes hits both alike. Reported per kind: the median
`LoadedModel.load_seconds` (inside `load_model`), the process's wall time
(imports included) and its peak resident memory; the ratio is cold / warm load
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, logging, resource, sys, time
start = time.perf_counter()
from bench.models import load_model
imported = time.perf_counter() - start
loaded = load_model("smollm2-135m", device="cpu")
print(json.dumps({
    "load_seconds": loaded.load_seconds,
    "import_seconds": imported,
    "cache_hit": loaded.cache_hit,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def load_once(cache: Path) -> dict:
    """Load the model in a fresh process with FEATBENCH_CACHE=cache."""
    env = {**os.environ, "FEATBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"model load failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2, help="cold+warm rounds")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="featbench-cache-") as cache:
            runs["cold"].append(load_once(Path(cache)))
            runs["warm"].append(load_once(Path(cache)))
    for kind, expect in (("cold", False), ("warm", True)):
        hits = {r["cache_hit"] for r in runs[kind]}
        if hits != {expect}:
            sys.exit(f"{kind} loads reported cache_hit={hits}, expected {expect}")

    summary = {
        kind: {
            key: statistics.median(r[key] for r in rows)
            for key in ("load_seconds", "process_seconds", "import_seconds", "peak_rss_mb")
        }
        for kind, rows in runs.items()
    }
    ratio = summary["cold"]["load_seconds"] / summary["warm"]["load_seconds"]
    print(f"# model load, smollm2-135m on CPU, {args.repeats} cold+warm rounds, fresh processes")
    for kind, s in summary.items():
        print(f"{kind}: load_model {s['load_seconds']:6.2f} s, process {s['process_seconds']:6.2f} s"
              f" (imports {s['import_seconds']:.2f} s), peak RSS {s['peak_rss_mb']:.0f} MB")  # fmt: skip
    print(f"ratio cold / warm load_model: {ratio:.1f}x; process: "
          f"{summary['cold']['process_seconds'] / summary['warm']['process_seconds']:.1f}x")  # fmt: skip

    if args.json:
        result = {"runs": runs, "median": summary, "ratio": ratio, "repeats": args.repeats}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

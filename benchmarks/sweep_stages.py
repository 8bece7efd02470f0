"""Where a finished sweep's time went: per method, the mean over its jobs (seeds) of each
stage's seconds, from the per-stage records every job keeps in its metrics file's metadata
(`meta["meta"]["stages"]`), and the sum over all jobs. Reads only what the run measured;
times nothing itself, so it may run beside other work.

    python benchmarks/sweep_stages.py results/compare_full/mlp_post [--json out.json]

Stages: fit (the method), calibrate / generate / judge (steering's stages under both
protocols; generate also gives its tokens and tokens/s), concept detection, reconstruction,
and `job` (the whole job, load and report included). The end-of-sweep report is not a job's
stage: its time is in the sweep's log.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bench.results import read_metrics

COLUMNS = ("fit", "calibrate", "generate", "judge", "concept_detection", "reconstruction")


def job_stages(meta: dict) -> dict[str, float]:
    """One job's seconds per column (steering's stages summed over its protocols)."""
    out: dict[str, float] = defaultdict(float)
    for record in meta.get("stages", []):
        name = record["stage"].split(":")[-1]
        if name in COLUMNS:
            out[name] += record["seconds"]
        if name == "generate":
            out["tokens"] += record.get("tokens", 0)
    out["job"] = meta["seconds"]
    return dict(out)


def sweep_stages(directory: Path) -> dict[str, list[dict[str, float]]]:
    """Per method, its jobs' stage seconds."""
    by_method: dict[str, list[dict[str, float]]] = defaultdict(list)
    for path in sorted(directory.glob("*/metrics.parquet")):
        frame, meta = read_metrics(path)
        by_method[str(frame["method"].iloc[0])].append(job_stages(meta["meta"]))
    if not by_method:
        raise SystemExit(f"no job folders with a metrics.parquet under {directory}")
    return dict(by_method)


def table(by_method: dict[str, list[dict[str, float]]]) -> str:
    def mean(jobs, key):
        return sum(j.get(key, 0.0) for j in jobs) / len(jobs)

    header = ["method", "jobs", *COLUMNS, "tokens/s (generate)", "job"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    total = 0.0
    for method, jobs in sorted(by_method.items()):
        total += sum(j["job"] for j in jobs)
        rate = mean(jobs, "tokens") / mean(jobs, "generate") if mean(jobs, "generate") else 0
        cells = [f"{mean(jobs, c):.0f}" for c in COLUMNS]
        lines.append(f"| {method} | {len(jobs)} | " + " | ".join(cells)
                     + f" | {rate:.0f} | {mean(jobs, 'job'):.0f} |")  # fmt: skip
    jobs = sum(len(j) for j in by_method.values())
    lines.append(f"\nSeconds, mean over each method's jobs. {jobs} jobs, {total / 60:.1f} min "
                 "in jobs (the sweep's wall time adds its report and start-up).")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    by_method = sweep_stages(args.directory)
    print(table(by_method))
    if args.json:
        args.json.write_text(json.dumps(by_method, indent=2))


if __name__ == "__main__":
    main()

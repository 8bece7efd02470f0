"""Steering cost, measured side by side in one run on the embedded default.

1. Alpha search: batched forward passes per feature spent by
   `bench.steer.search_alpha` against sequential bisection (20 steps per
   target and sign over the 7 KL targets, one forward pass per step), at the
   same tolerance; wall time of both too.
2. Generation: tokens/s of batched generation (KV cache) against generating
   the same samples one sequence at a time; per-sample seeds make the texts
   identical, which is checked.

    python benchmarks/steering.py [--features 2] [--samples 32] [--layer 12] [--json out.json]

Run it on an otherwise idle machine: on 2 cores any other process halves it.
Progress bars go to stderr: `python benchmarks/steering.py 2>/dev/null`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.activations import extract
from bench.datasets import load
from bench.models import load_model
from bench.steer import generate, next_token_kl, search_alpha, unsteered
from methods.diffmean import DiffMean
from tasks.steering import Steering


def bisection(model, hook, direction, task, steps=20):
    """Sequential bisection per (target, sign): one forward pass per step."""
    passes, hits = 0, 0
    base = unsteered(model, hook, task.prompts)  # the unsteered pass, once (not counted)
    hi0 = 100.0 * 20  # an upper bound on |alpha| far past every target here
    for sign in (1, -1):
        for target in task.kl_targets:
            lo, hi, best = 0.0, hi0, None
            for _ in range(steps):
                mid = (lo + hi) / 2
                kl, n = next_token_kl(
                    model, hook, task.prompts, (sign * mid * direction)[None], 1, base
                )
                passes += n
                if best is None or abs(kl[0] - target) < abs(best - target):
                    best = kl[0]
                lo, hi = (mid, hi) if kl[0] < target else (lo, mid)
            hits += abs(best - target) <= task.tolerance
    return passes, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=2, help="DiffMean features to search")
    parser.add_argument("--samples", type=int, default=32, help="sequences to generate")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: the task's 50")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    lm = load_model("smollm2-135m")
    model, ds = lm.model, load()
    acts = extract(model, ds, args.layer, "mlp_post", model_fingerprint=lm.fingerprint)
    feats = DiffMean().fit(acts.subset(ds.indices("train")))
    unit = feats.directions / feats.directions.norm(dim=1, keepdim=True)
    task = Steering() if args.new_tokens is None else Steering(max_new_tokens=args.new_tokens)
    n_pairs = 2 * len(task.kl_targets)

    print(f"# alpha search, {args.features} DiffMean features, layer {args.layer}, "
          f"{len(task.kl_targets)} targets x 2 signs, tolerance {task.tolerance}")  # fmt: skip
    ours, theirs, t_ours, t_theirs, hit_ours, hit_theirs = [], [], 0.0, 0.0, 0, 0
    for f in range(args.features):
        t = time.perf_counter()
        found, passes = search_alpha(model, feats.hook, unit[f], task)
        t_ours += time.perf_counter() - t
        ours.append(passes)
        hit_ours += sum(r[2] is None for r in found.values())
        t = time.perf_counter()
        passes, hits = bisection(model, feats.hook, unit[f], task)
        t_theirs += time.perf_counter() - t
        theirs.append(passes)
        hit_theirs += hits
    total = args.features * n_pairs
    print(f"batched search : {np.mean(ours):6.1f} passes/feature, {t_ours / args.features:6.2f} "
          f"s/feature, {hit_ours}/{total} (target, sign) within tolerance")  # fmt: skip
    print(
        f"bisection (20) : {np.mean(theirs):6.1f} passes/feature, "
        f"{t_theirs / args.features:6.2f} s/feature, {hit_theirs}/{total} within tolerance"
    )
    print(f"ratio          : {np.mean(theirs) / np.mean(ours):.1f}x fewer passes "
          f"({np.mean(theirs) / 2 / np.mean(ours):.1f}x against the issue's 140 = one sign), "
          f"{t_theirs / t_ours:.1f}x less wall time")  # fmt: skip

    vec = 8.0 * unit[0]
    specs = [(task.prompts[0], vec, (42, 1, 0, 2, s)) for s in range(args.samples)]
    print(f"\n# generation, {args.samples} samples x {task.max_new_tokens} new tokens")
    t = time.perf_counter()
    counted: dict = {}
    batched = generate(model, feats.hook, specs, task, counted)
    t_batched = time.perf_counter() - t
    single_cfg = Steering(batch_size=1, max_new_tokens=task.max_new_tokens)
    t = time.perf_counter()
    single = generate(model, feats.hook, specs, single_cfg)
    t_single = time.perf_counter() - t
    tokens = counted["tokens"]
    rows = min(task.batch_size, args.samples)
    print(f"batched ({rows} rows) : {tokens / t_batched:7.1f} tok/s ({t_batched:.1f} s)")
    print(f"single-sequence  : {tokens / t_single:7.1f} tok/s ({t_single:.1f} s)")
    print(f"ratio            : {t_single / t_batched:.1f}x; identical texts: {batched == single}")

    if args.json:
        result = {
            "features": args.features,
            "layer": args.layer,
            "kl_targets": list(task.kl_targets),
            "tolerance": task.tolerance,
            "search_passes_per_feature": float(np.mean(ours)),
            "bisection_passes_per_feature": float(np.mean(theirs)),
            "passes_ratio": float(np.mean(theirs) / np.mean(ours)),
            "search_seconds_per_feature": t_ours / args.features,
            "bisection_seconds_per_feature": t_theirs / args.features,
            "wall_ratio": t_theirs / t_ours,
            "search_within_tolerance": int(hit_ours),
            "bisection_within_tolerance": int(hit_theirs),
            "pairs": total,
            "samples": args.samples,
            "new_tokens": task.max_new_tokens,
            "generated_tokens": tokens,
            "batch_rows": rows,
            "batched_tokens_per_second": tokens / t_batched,
            "single_tokens_per_second": tokens / t_single,
            "generation_ratio": t_single / t_batched,
            "identical_texts": batched == single,
        }
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

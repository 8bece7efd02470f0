"""Steering cost, measured side by side in one run on the embedded default.

1. Alpha search: batched forward passes per feature spent by
   `bench.tasks.steering.generate.search_alpha` against sequential bisection (20 steps per
   target and sign over the 7 KL targets, one forward pass per step), at the
   same tolerance; wall time of both too.
2. Generation at the steering task's batch (128 rows): tokens/s of the lean decoder
   (`bench.tasks.steering.decode`, the default) against the reference path (TransformerLens's own
   forward with its KV cache), both measured twice, interleaved, best of each; the
   fraction of the FLOP limit (the step's matmuls at this batch's shapes, timed in the
   same run); how many texts are identical under the same per-sample seeds, and the
   first divergence; and a few rows generated one at a time (batching changes no text).
3. The steering task end to end (`--concepts` concepts, 8 by default, under the default
   concept protocol, DiffMean's directions, the offline judge): the tokens it generated
   divided by the wall time of the whole task, against the lean decoder's rate at the
   task's batch measured above (`task_vs_decoder`), with the task's own stage timings
   (describe, calibrate, generate, judge) and the generation stage's rate alone
   (`generate_vs_decoder`).

    python benchmarks/steering.py [--model smollm2-135m] [--features 2] [--rows 128] [--layer L]
        [--concepts 8] [--json out.json]

Run it on an otherwise idle machine: on 2 cores any other process halves it.
Progress bars go to stderr: `python benchmarks/steering.py 2>/dev/null`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.activations.extraction import extract
from bench.core.stages import Stages
from bench.data.datasets import load
from bench.judges.offline import OfflineJudge
from bench.models import load_model
from bench.models.sources import embedded_model
from bench.tasks.steering.calibrate import search_alpha
from bench.tasks.steering.decode import LeanDecoder
from bench.tasks.steering.generate import generate
from bench.tasks.steering.kl import next_token_kl, unsteered
from featbench.methods.diffmean import DiffMean
from featbench.tasks.base import TaskData
from featbench.tasks.steering import Steering


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


def flop_limit(model, rows: int, repeats: int = 5) -> dict:
    """Tokens/s if a decode step at this batch cost only its matmuls, two ways:

    - `in_place`: one pass through the model's own weights as the lean decoder lays them
      out (per layer the fused Q/K/V, the output projection, the fused gate/in and the out
      projection, then the unembedding), on random inputs of this batch's shapes, best of
      `repeats`: what a step's matmuls cost with every layer's weights read from memory;
    - `isolated`: each distinct shape timed on its own, repeatedly, so its weights stay in
      cache (the upper bound the issue's 181-190 GFLOP/s figures come from).

    The attention over the cache (about 4 x rows x context x d_model flops per layer) is
    neither counted nor timed: at 50 new tokens it is a few percent of a step."""
    decoder = LeanDecoder(model)
    weights = []
    for layer in decoder.layers:
        gate = layer.get("w_gate_in", layer.get("w_in"))
        weights += [(layer["w_qkv"], layer["b_qkv"]), (layer["w_o"], layer["b_o"]),
                    (gate, None), (layer["w_out"], layer["b_out"])]  # fmt: skip
    weights.append((decoder.w_u, decoder.b_u))
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w, _ in weights}
    flops = sum(2 * rows * w.shape[0] * w.shape[1] for w, _ in weights)

    def timed(pairs) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for w, b in pairs:
                torch.nn.functional.linear(inputs[w.shape[1]], w, b)
            best = min(best, time.perf_counter() - t)
        return best

    in_place = timed(weights)
    shapes = {}
    for w, b in weights:
        shapes.setdefault(tuple(w.shape), [w, b, 0])[2] += 1
    isolated = sum(count * timed([(w, b)]) for w, b, count in shapes.values())
    return {
        "tokens_per_second": rows / in_place,
        "gflops": flops / in_place / 1e9,
        "isolated_tokens_per_second": rows / isolated,
        "isolated_gflops": flops / isolated / 1e9,
    }


def first_divergence(a: list[str], b: list[str]) -> str | None:
    """The first pair of texts that differ, cut at the first differing character."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            at = next(
                (j for j, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                min(len(x), len(y)),
            )
            return f"row {i} at character {at}: {x[max(0, at - 30) : at + 30]!r} vs {y[max(0, at - 30) : at + 30]!r}"
    return None


def task_rate(model, ds, acts, feats, args) -> dict:
    """The steering task run whole on DiffMean's directions (`args.concepts` concepts, the
    default concept protocol, the offline judge), timed by its own stages."""
    with tempfile.TemporaryDirectory() as folder:
        stages = Stages()
        data = TaskData(dataset=ds, activations=acts, seed=42, output_dir=Path(folder), judge=OfflineJudge(), stage=stages)  # fmt: skip
        task = Steering(concepts=args.concepts)
        start = time.perf_counter()
        task.evaluate(model, feats, data, None)
        seconds = time.perf_counter() - start
    generated = next(r for r in stages.records if r["stage"] == "steering:generate")
    return {
        "tokens": generated["tokens"],
        "seconds": seconds,
        "tokens_per_second": generated["tokens"] / seconds,
        "generate_tokens_per_second": generated["tokens"] / generated["seconds"],
        "stages": {r["stage"]: r["seconds"] for r in stages.records},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=2, help="DiffMean features to search")
    parser.add_argument(
        "--rows", type=int, default=None, help="rows in the batch (default: the task's 128)"
    )
    parser.add_argument("--single", type=int, default=8, help="rows also generated one at a time")
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model (conf/model/)")
    parser.add_argument("--layer", type=int, default=None, help="default: the model's own")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: the task's 50")
    parser.add_argument("--concepts", type=int, default=8, help="concepts the task steers")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    entry = embedded_model(args.model)  # the model's YAML: its context length and layer
    lm = load_model(args.model, n_ctx=entry.n_ctx)
    args.layer = entry.default_layer if args.layer is None else args.layer
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

    rows = args.rows or task.batch_size
    vec = 8.0 * unit[0]
    specs = [(task.prompts[0], vec, (42, 1, 0, 2, s)) for s in range(rows)]
    print(f"\n# generation, {rows} rows x {task.max_new_tokens} new tokens (one batch)")
    timed = {}
    for engine in ("reference", "lean", "reference", "lean"):  # interleaved: drift hits both
        counted: dict = {}
        t = time.perf_counter()
        texts = generate(model, feats.hook, specs, task, counted, engine=engine)
        seconds = time.perf_counter() - t
        best = timed.get(engine)
        if best is None or seconds < best[0]:
            timed[engine] = (seconds, counted["tokens"], texts)
    (t_ref, tokens, reference), (t_lean, tokens_lean, lean) = timed["reference"], timed["lean"]
    same = sum(a == b for a, b in zip(reference, lean, strict=True))
    limit = flop_limit(model, rows)
    print(f"reference (TransformerLens) : {tokens / t_ref:7.1f} tok/s ({t_ref:.1f} s)")
    print(
        f"lean (bench.tasks.steering.decode)         : {tokens_lean / t_lean:7.1f} tok/s ({t_lean:.1f} s)"
    )
    print(f"FLOP limit at {rows} rows     : {limit['tokens_per_second']:7.1f} tok/s "
          f"({limit['gflops']:.0f} GFLOP/s: the step's matmuls over the model's weights, "
          "unembedding included)")  # fmt: skip
    print(f"  shapes timed in isolation : {limit['isolated_tokens_per_second']:7.1f} tok/s "
          f"({limit['isolated_gflops']:.0f} GFLOP/s, weights hot in cache: an upper bound)")  # fmt: skip
    print(f"speed-up vs reference       : {t_ref / t_lean:.2f}x (target >= 1.4)")
    print(f"fraction of the FLOP limit  : {tokens_lean / t_lean / limit['tokens_per_second']:.2f} "
          f"(target >= 0.6); of the isolated-shape bound: "
          f"{tokens_lean / t_lean / limit['isolated_tokens_per_second']:.2f}")  # fmt: skip
    print(f"identical texts             : {same}/{rows}")
    divergence = first_divergence(reference, lean)
    if divergence:
        print(f"first divergence            : {divergence}")

    single_rows = min(args.single, rows)
    t = time.perf_counter()
    single = generate(model, feats.hook, specs[:single_rows], Steering(batch_size=1,
                      max_new_tokens=task.max_new_tokens))  # fmt: skip
    t_single = time.perf_counter() - t
    single_tokens = sum(len(model.tokenizer.encode(x)) for x in single) or 1
    print(f"single-sequence (lean, {single_rows} rows): about {single_tokens / t_single:.1f} tok/s; "
          f"batched is {single_tokens / t_single and (tokens_lean / t_lean) / (single_tokens / t_single):.1f}x; "
          f"identical texts: {single == lean[:single_rows]}")  # fmt: skip

    end_to_end = task_rate(model, ds, acts, feats, args)
    lean_rate = tokens_lean / t_lean
    print(f"\n# the steering task end to end, {args.concepts} concepts (DiffMean, offline judge)")
    for name, seconds in end_to_end["stages"].items():
        print(f"  {name:<22}: {seconds:7.1f} s")
    print(f"task: {end_to_end['tokens']} tokens in {end_to_end['seconds']:.1f} s = "
          f"{end_to_end['tokens_per_second']:.1f} tok/s")  # fmt: skip
    print(f"task_vs_decoder             : {end_to_end['tokens_per_second'] / lean_rate:.2f} "
          f"(target >= 0.8; the decoder alone: {lean_rate:.1f} tok/s at {rows} rows)")  # fmt: skip
    print(f"generate_vs_decoder         : {end_to_end['generate_tokens_per_second'] / lean_rate:.2f} "
          "(the generation stage alone)")  # fmt: skip

    if args.json:
        result = {
            "model": args.model,
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
            "new_tokens": task.max_new_tokens,
            "batch": rows,
            "generated_tokens": tokens,
            "reference_tokens_per_second": tokens / t_ref,
            "lean_tokens_per_second": tokens_lean / t_lean,
            "flop_limit_tokens_per_second": limit["tokens_per_second"],
            "matmul_gflops": limit["gflops"],
            "isolated_flop_limit_tokens_per_second": limit["isolated_tokens_per_second"],
            "isolated_matmul_gflops": limit["isolated_gflops"],
            "fraction_of_isolated_flop_limit": tokens_lean
            / t_lean
            / limit["isolated_tokens_per_second"],
            "fraction_of_flop_limit": tokens_lean / t_lean / limit["tokens_per_second"],
            "generation_speedup_vs_reference": t_ref / t_lean,
            "identical_texts": same,
            "first_divergence": divergence,
            "single_rows": single_rows,
            "single_tokens_per_second": single_tokens / t_single,
            "single_identical_to_batched": single == lean[:single_rows],
            "task_concepts": args.concepts,
            "task_tokens": end_to_end["tokens"],
            "task_seconds": end_to_end["seconds"],
            "task_stage_seconds": end_to_end["stages"],
            "task_tokens_per_second": end_to_end["tokens_per_second"],
            "task_vs_decoder": end_to_end["tokens_per_second"] / lean_rate,
            "generate_vs_decoder": end_to_end["generate_tokens_per_second"] / lean_rate,
        }
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

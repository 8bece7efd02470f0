"""Why some SNMF fits run many times slower per iteration: subnormal floats, measured side by
side in one run (not a test).

    python benchmarks/snmf_denormals.py                       # mlp_post, inits kmeans,svd,random
    python benchmarks/snmf_denormals.py --hook resid_post --iters 20 --json out.json

On the embedded model's train activations at `--hook` (the default layer, the activation
cache), for each init: SNMF.factorize for `--iters` iterations twice, the second time with
the CPU flushing subnormal results to zero (`torch.set_flush_denormal`, this script's own
process only), and prints
- seconds per iteration of each, and their ratio;
- the share of G's entries that are subnormal (0 < |g| < float32's smallest normal) at the
  end of the plain fit, and how many are exactly zero;
- the two fits' relative errors (the same numbers to float32 precision when the subnormals
  carry no weight).
A ratio far above 1 together with subnormal entries in G says the slowness is the CPU's
slow path for subnormal arithmetic, not the algorithm.

Since `multiplicative_step` sends G's subnormal entries to 0 itself, the plain fit should
show a ratio of about 1 and no subnormal entries. Flush mode is set on the calling thread
only (the CPU's control register is per thread), so torch's worker threads still take the
slow path: the "flushed" column of a fit that has subnormals understates the gap. Before
the mend (3c16932), `--inits kmeans --iters 40`: 0.766 s/it plain, 0.490 flushed on two
threads, but 1.417 and 0.270 (x5.2) with OMP_NUM_THREADS=1; after it, 0.156 on two threads
and 0.273 on one, the same relative error (0.90804) in all six.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.activations.extraction import extract
from bench.data.datasets import load
from bench.models import load_model
from bench.models.sources import embedded_model
from featbench.methods.snmf import SNMF

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


def subnormal_share(g: torch.Tensor) -> tuple[float, float]:
    a = g.abs()
    return float(((a > 0) & (a < TINY)).float().mean()), float((a == 0).float().mean())


def timed_fit(x: torch.Tensor, init: str, iters: int, flush: bool) -> dict:
    method = SNMF(init=init, max_iter=iters, patience=iters + 1, device="cpu")
    torch.set_flush_denormal(flush)
    try:
        start = time.perf_counter()
        fit = method.factorize(x, progress=False)
        seconds = time.perf_counter() - start
    finally:
        torch.set_flush_denormal(False)
    sub, zero = subnormal_share(fit["G"])
    return {
        "seconds_per_iteration": seconds / fit["report"]["iterations"],
        "relative_error": fit["report"]["relative_error"],
        "subnormal_share_of_G": sub,
        "zero_share_of_G": zero,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="mlp_post")
    parser.add_argument("--inits", default="kmeans,svd,random")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.set_flush_denormal(False):
        raise SystemExit("this CPU cannot flush subnormals (no SSE3): nothing to compare")
    entry = embedded_model(args.model)
    lm = load_model(args.model, n_ctx=entry.n_ctx)
    ds = load()
    acts = extract(lm.model, ds, entry.default_layer, args.hook, model_fingerprint=lm.fingerprint)
    x = acts.subset(ds.indices("train")).acts
    result = {"model": args.model, "hook": args.hook, "tokens": x.shape[0], "width": x.shape[1]}
    for init in args.inits.split(","):
        plain = timed_fit(x, init, args.iters, flush=False)
        flushed = timed_fit(x, init, args.iters, flush=True)
        ratio = plain["seconds_per_iteration"] / flushed["seconds_per_iteration"]
        result[init] = {"plain": plain, "flushed": flushed, "slowdown": ratio}
        print(
            f"{init:7s} {plain['seconds_per_iteration']:.3f} s/it plain, "
            f"{flushed['seconds_per_iteration']:.3f} flushed: x{ratio:.1f}; G subnormal "
            f"{plain['subnormal_share_of_G']:.1%}, zero {plain['zero_share_of_G']:.1%}; "
            f"relative error {plain['relative_error']:.5f} / {flushed['relative_error']:.5f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

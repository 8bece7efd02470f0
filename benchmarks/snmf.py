"""SNMF speed and scale, measured side by side in one run (not a test).

    python benchmarks/snmf.py                 # n=20,000 x d=1,536 x k=100, 20 iterations
    python benchmarks/snmf.py --scale         # also n=1,000,000 x d=2,048 x k=100, 10 iterations
    python benchmarks/snmf.py --no-compare --scale --scale-iters 3 --json out.json

Prints, for the same data, seed and iteration count:
- featbench's SNMF (`featbench.methods.snmf.SNMF.factorize`): seconds per iteration and
  achieved GFLOP/s (4ndk + 6nk^2 useful flops per iteration);
- this machine's matmul peak, measured now on the shapes SNMF uses and a
  large square product;
- a direct implementation of the same update that recomputes the full d x n
  reconstruction for its loss every iteration (written below, as the paper's
  code does it), and the speed ratio;
- whether both reached the same iterates (max |Z difference| and relative
  errors).
With --scale: seconds per iteration and peak resident memory for one million
tokens stored as float16.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch

from featbench.methods.snmf import SNMF, negative, positive, winner_take_all


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(m: int, k: int, n: int, reps: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def naive_snmf(a: torch.Tensor, k: int, p: float, iters: int, seed: int, reg: float = 1e-6):
    """The update as written in the paper's code: full matrices, loss from the
    explicit reconstruction A - Z G^T (d x n) every iteration."""
    d, n = a.shape
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(n, k, generator=gen).clamp_min(1e-6)
    best_loss, best_z, losses = math.inf, None, []
    for _ in range(iters):
        gtg = g.T @ g
        z = a @ g @ torch.linalg.inv(gtg + reg * torch.eye(k))
        z = winner_take_all(z, p)
        norms = g.norm(dim=0).clamp_min(1e-8)
        g = g / norms
        z = z * norms
        pmat, q = a.T @ z, z.T @ z
        g = g * torch.sqrt(
            (positive(pmat) + g @ negative(q)) / (negative(pmat) + g @ positive(q) + 1e-12)
        )
        loss = float(torch.linalg.norm(a - z @ g.T) ** 2)
        losses.append(loss)
        if loss < best_loss - 1e-4:
            best_loss, best_z = loss, z.clone()
    return best_z, losses


def compare(n: int, d: int, k: int, p: float, iters: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    # Sparse non-negative mixtures of sparse signed features plus noise: MLP-like, and
    # a factorization problem whose iterates are stable enough to compare.
    z_true = torch.randn(d, k, generator=gen) * (torch.rand(d, k, generator=gen) < 0.05)
    y_true = torch.rand(k, n, generator=gen) * (torch.rand(k, n, generator=gen) < 0.1)
    x = (z_true @ y_true).T + 0.05 * torch.randn(n, d, generator=gen)

    print(
        f"\n== SNMF n={n:,} tokens x d={d:,} x k={k}, p={p}, {iters} iterations, torch threads {torch.get_num_threads()}"
    )
    peaks = {
        f"({min(n, 8192)} x {d}) @ ({d} x {k})": matmul_gflops(min(n, 8192), d, k),
        f"({d} x {min(n, 8192)}) @ ({min(n, 8192)} x {k})": matmul_gflops(d, min(n, 8192), k),
        "(2048 x 2048) @ (2048 x 2048)": matmul_gflops(2048, 2048, 2048),
    }
    for shape, gflops in peaks.items():
        print(f"matmul peak {shape:<34} {gflops:7.1f} GFLOP/s")
    peak = max(peaks.values())

    fast = SNMF(rank=k, sparsity=p, max_iter=iters, patience=iters + 1, seed=42, device="cpu")
    start = time.perf_counter()
    out = fast.factorize(x, progress=False)
    fast_s = (time.perf_counter() - start) / iters
    flops = 4 * n * d * k + 6 * n * k * k
    print(
        f"featbench SNMF: {fast_s * 1e3:8.1f} ms/iteration, {flops / fast_s / 1e9:6.1f} GFLOP/s = {flops / fast_s / 1e9 / peak:.0%} of peak"
    )

    start = time.perf_counter()
    naive_z, naive_losses = naive_snmf(x.T.contiguous(), k, p, iters, seed=42)
    naive_s = (time.perf_counter() - start) / iters
    print(f"direct (full reconstruction) SNMF: {naive_s * 1e3:8.1f} ms/iteration")
    print(f"speed-up over the direct implementation: {naive_s / fast_s:.2f}x")

    sq = float(x.double().pow(2).sum())
    diff = float((out["Z"] - naive_z).abs().max() / naive_z.abs().max())
    rel_fast = out["report"]["relative_error"]
    rel_naive = math.sqrt(min(naive_losses) / sq)
    print(
        f"same iterates: max |Z_fast - Z_direct| / max|Z| = {diff:.2e}; relative error {rel_fast:.5f} vs {rel_naive:.5f}"
    )
    return {
        "tokens": n,
        "width": d,
        "rank": k,
        "sparsity": p,
        "iters": iters,
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": peaks,
        "fast_seconds_per_iter": fast_s,
        "fast_gflops": flops / fast_s / 1e9,
        "fraction_of_peak": flops / fast_s / 1e9 / peak,
        "naive_seconds_per_iter": naive_s,
        "speedup_vs_naive": naive_s / fast_s,
        "max_relative_z_difference": diff,
        "relative_error_fast": rel_fast,
        "relative_error_naive": rel_naive,
    }


def scale(n: int, d: int, k: int, p: float, iters: int) -> dict:
    print(
        f"\n== scale: n={n:,} x d={d:,} (float16 storage, {n * d * 2 / 2**30:.1f} GiB) x k={k}, {iters} iterations"
    )
    x = torch.empty(n, d, dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        x[start:stop] = torch.randn(stop - start, d, generator=gen).relu_().half()
    data_rss = peak_rss_gib()
    print(f"activations ready; peak RSS so far {data_rss:.1f} GiB")
    method = SNMF(rank=k, sparsity=p, max_iter=iters, patience=iters + 1, device="auto")
    start = time.perf_counter()
    out = method.factorize(x)
    seconds = time.perf_counter() - start
    print(f"{iters} iterations in {seconds:.1f} s ({seconds / iters:.1f} s/iteration, setup included); "
          f"relative error {out['report']['relative_error']:.4f}; peak RSS {peak_rss_gib():.1f} GiB")  # fmt: skip
    return {
        "tokens": n,
        "width": d,
        "rank": k,
        "iters": iters,
        "data_gib": n * d * 2 / 2**30,
        "seconds": seconds,
        "seconds_per_iter": seconds / iters,
        "relative_error": out["report"]["relative_error"],
        "peak_rss_gib_after_data": data_rss,
        "peak_rss_gib": peak_rss_gib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=100)
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--scale", action="store_true", help="also run n=1,000,000 x d=2,048")
    parser.add_argument("--scale-tokens", type=int, default=1_000_000, help="tokens for --scale")
    parser.add_argument("--scale-width", type=int, default=2048, help="width for --scale")
    parser.add_argument("--scale-iters", type=int, default=10, help="iterations for --scale")
    parser.add_argument("--no-compare", action="store_true", help="skip the speed comparison")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    result = {}
    if not args.no_compare:
        result["compare"] = compare(args.tokens, args.width, args.rank, args.sparsity, args.iters)
    if args.scale:
        result["scale"] = scale(
            args.scale_tokens, args.scale_width, args.rank, args.sparsity, args.scale_iters
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

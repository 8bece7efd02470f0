"""SNMF: semi-nonnegative matrix factorization of MLP activations (arXiv 2506.10920).

The activation matrix A (d x n, one column per token) is factorized as
A ~= Z Y with Z signed (d x k: each column a feature, a sparse combination of
neurons) and Y >= 0 (k x n: how much each token uses each feature). We hold
A transposed, X = A^T (n x d, the ActivationSet's layout), and G = Y^T (n x k).

One iteration, as in the paper's code:

1. Z <- A Y^T (Y Y^T + lambda I)^-1                (least squares, lambda = 1e-6)
2. winner-take-all: each column of Z keeps its ceil(p d) largest |entries|
3. each row of Y is scaled to unit L2 norm, the column of Z by the inverse
4. Y <- Y * sqrt(((A^T Z)+ + G (Z^T Z)-) / ((A^T Z)- + G (Z^T Z)+))
   (Ding, Li & Jordan 2010; X+ and X- are the positive and negative parts)

and the best-loss Z is kept; fitting stops after `max_iter` iterations or
when the loss has not improved by more than `tol` for `patience` iterations.
The defaults, 500 / 100, are featbench's CPU budget (they are also the reference
`NMFSemiNMF.fit`'s own defaults, which no paper run uses); the authors' run scripts
use 2000 / 1500 (conf/experiment/paper_method/*/snmf.yaml).

Why it is fast: one pass over X per iteration. Steps 4 and the statistics
the next step 1 needs (X^T G and G^T G) are fused per chunk of tokens, so X
is read once, memory beyond X is O((d + n) k), and X may be stored as
float16/bfloat16 or memory-mapped (chunks are upcast as they are read). The
loss ||A - Z Y||^2 = ||X||^2 - 2 tr(Z^T X^T G) + tr(Z^T Z G^T G) never builds
the d x n reconstruction.

Why our loss differs from the reference's log: the reference computes
`torch.norm(A - F G^T, p='fro')**2` in float32. That sums ~1e8 positive squares in
float32 accumulators; once a partial sum is large, each small square loses its low
bits when added, and a square below half an ulp of the sum is lost altogether, so the
error is one-sided and the value reads low (about 0.3% on CPU against an exact sum,
per the comparison in docs/paper-protocol.md). The loss here is exact up to float32
matmul rounding: ||X||^2 is summed in float64 and the two traces are taken in float64
from the float32 statistics X^T G and G^T G. The iterates are the same; only the
logged loss, and so the iteration `tol`/`patience` call the best, can differ.

`encode` for new tokens gives non-negative coefficients for the fixed Z
(the same multiplicative rule with Z held fixed, from a clamped least-squares
start): `encode="nnls"`, the default, which `decode` inverts (reconstruction,
steering magnitudes). `encode="cosine"` gives the paper's detection score,
the cosine of each token's activation with the unit feature direction; use it
to reproduce the paper's concept-detection numbers (S_CD).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from bench.core.device import resolve_device
from bench.errors import ConfigError
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method

log = logging.getLogger(__name__)

INITS = ("random", "svd", "kmeans")
ENCODINGS = ("nnls", "cosine")
EPS = 1e-12  # keeps 0/0 out of the multiplicative update (a token with no support)


def positive(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() + x) * 0.5


def negative(x: torch.Tensor) -> torch.Tensor:
    return (x.abs() - x) * 0.5


def winner_take_all(z: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the ceil(p d) largest-|.| entries of each column of z (d x k), zero the rest."""
    keep = max(1, math.ceil(p * z.shape[0]))
    index = z.abs().topk(keep, dim=0).indices
    mask = torch.zeros_like(z).scatter_(0, index, 1.0)
    return z * mask


def multiplicative_step(g: torch.Tensor, xz: torch.Tensor, ztz: torch.Tensor) -> torch.Tensor:
    """Ding et al.'s semi-NMF update of G (n x k) for fixed Z, given X Z and Z^T Z.

    Entries the update drives below the dtype's smallest normal float are set to 0: the
    rule shrinks unused entries geometrically, and once they are subnormal every matmul
    that reads G takes the CPU's slow path for subnormal arithmetic (1.3-1.6x per
    iteration at mlp_post, and a paper-length fit slowing 10x as they accumulate; see
    benchmarks/snmf_denormals.py). This is what a CPU in flush-to-zero mode computes; an
    entry under 1.2e-38 carries nothing into the loss at float32 precision.
    """
    numerator = positive(xz) + g @ negative(ztz)
    denominator = negative(xz) + g @ positive(ztz)
    g = g * torch.sqrt(numerator / (denominator + EPS))
    return g.masked_fill_(g < torch.finfo(g.dtype).tiny, 0.0)


class SNMFFeatures(Features):
    """Unit directions (columns of Z, normalized); `extra["Z"]` keeps Z itself so
    that `decode(encode(x))` reconstructs on the factorization's own scale."""

    def encode(self, acts: ActivationSet | torch.Tensor) -> torch.Tensor:
        x = acts.acts if isinstance(acts, ActivationSet) else acts
        mode = self.info.get("encode", "nnls")
        if mode == "cosine":
            x = x.float()
            return (x @ self.directions.T) / x.norm(dim=1, keepdim=True).clamp_min(EPS)
        return nnls_codes(x, self.extra["Z"], int(self.info.get("encode_iters", 100)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() @ self.extra["Z"].T


def nnls_codes(x: torch.Tensor, z: torch.Tensor, iters: int, chunk: int = 8192) -> torch.Tensor:
    """Non-negative G minimising ||X - G Z^T||: least squares clamped to >= 0,
    then `iters` multiplicative updates with Z fixed (monotone in the loss)."""
    z = z.float()
    ztz = z.T @ z
    pinv = torch.linalg.pinv(ztz)
    out = []
    for start in range(0, x.shape[0], chunk):
        xz = x[start : start + chunk].float() @ z
        g = (xz @ pinv).clamp_min(1e-6)
        for _ in range(iters):
            g = multiplicative_step(g, xz, ztz)
        out.append(g)
    return torch.cat(out) if out else torch.zeros(0, z.shape[1])


@dataclass
class SNMF(Method):
    name: ClassVar[str] = "snmf"

    rank: int = 100  # k: the paper's default number of features
    sparsity: float = 0.01  # p: each feature keeps ceil(p d) neurons (the paper's 1%)
    init: str = "random"  # random | svd | kmeans (the paper's code offers all three)
    max_iter: int = 500  # featbench's CPU budget (the paper's runs: 2000; reference fit(): 500)
    tol: float = 1e-4  # an improvement smaller than this (squared loss) does not count
    patience: int = 100  # stale iterations before stopping (paper runs: 1500; reference fit(): 100)
    reg: float = 1e-6  # lambda in (Y Y^T + lambda I)^-1, keeps the k x k solve well posed
    seed: int = 42  # the run's seed, handed over by the job (Method.seeded); 42: the paper's code's
    chunk_size: int = 8192  # tokens per fused matmul chunk: bounds memory beyond X
    device: str = "auto"  # cuda when present
    encode: str = "nnls"  # nnls (coefficients, decodable) | cosine (the paper's detection score)
    encode_iters: int = 100  # multiplicative updates per encode call
    # Drop train tokens whose norm exceeds this multiple of the median before fitting
    # (null: fit every token, as the paper). In the residual stream a few tokens of massive
    # norm can dominate the squared loss (docs/findings.md, "The spliced reconstruction").
    massive_norm: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity <= 1.0:
            raise ConfigError(f"method.sparsity={self.sparsity}: must be in (0, 1]")
        if self.init not in INITS:
            raise ConfigError(f"method.init={self.init!r}; allowed: {list(INITS)}")
        if self.encode not in ENCODINGS:
            raise ConfigError(f"method.encode={self.encode!r}; allowed: {list(ENCODINGS)}")
        for key in ("rank", "max_iter", "patience", "chunk_size", "encode_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}={getattr(self, key)}: must be >= 1")
        if self.massive_norm is not None and not self.massive_norm > 1:
            raise ConfigError(
                f"method.massive_norm={self.massive_norm}: must be > 1 (a multiple of the "
                "median token norm) or null (fit every token)"
            )

    def bounded_rank(self) -> int:
        return self.rank  # a factorization's rank: at most min(tokens, width)

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> SNMF:
        """`rank` <- k. Capacity only: `sparsity` stays as configured (SNMF's own choice of
        neurons per feature, the paper's 1% by default). Given the generator: `sparsity` <- its
        neuron density (SNMF's own parameter, so it is told exactly as much as TopK's k is)."""
        sparsity = self.sparsity if generator is None else generator.neuron_density
        return replace(self, rank=k, sparsity=sparsity)

    def fit(self, acts: ActivationSet) -> Features:
        x, dropped = acts.acts, 0
        if self.massive_norm is not None:
            norms = x.float().norm(dim=1)
            keep = norms <= self.massive_norm * norms.median()
            x, dropped = x[keep], int((~keep).sum())
            log.info(
                "snmf: %d of %d train tokens have a norm above %g x the median and are "
                "left out of the fit",
                dropped,
                len(keep),
                self.massive_norm,
            )
        fit = self.factorize(x)
        info = {
            **fit.pop("report"),
            "encode": self.encode,
            "encode_iters": self.encode_iters,
            "massive_tokens_dropped": dropped,
        }
        return make_features(fit["Z"], self.name, acts.hook, info)

    def factorize(self, x: torch.Tensor, progress: bool = True) -> dict[str, Any]:
        """Factorize X (n x d, any float dtype) into Z (d x k) and G (n x k) >= 0: the
        best-loss iterate's pair."""
        n, d = x.shape
        k = self.rank
        if k > min(n, d):
            raise ConfigError(
                f"method.rank={k} exceeds min(tokens, width) = min({n}, {d}); choose rank <= {min(n, d)}"
            )
        device = torch.device(resolve_device(self.device))
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        start = time.perf_counter()
        sq_norm = sum(float(c.double().pow(2).sum()) for _, c in self._chunks(x, device))
        g, z0 = self._init(x, k, gen, device)
        m, s = self._statistics(x, g, device)  # X^T G (d x k), G^T G (k x k)
        eye = torch.eye(k, device=device) * self.reg
        best = {"loss": math.inf, "Z": z0, "G": g.clone(), "iteration": -1}
        losses, stale = [], 0
        bar = tqdm(range(self.max_iter), desc=f"snmf k={k}", leave=False, disable=not progress)
        for it in bar:
            z = torch.linalg.solve(s + eye, m.T).T  # = M (S + lambda I)^-1, S symmetric
            z = winner_take_all(z, self.sparsity)
            scale = s.diagonal().clamp_min(0).sqrt().clamp_min(1e-8)  # row norms of Y
            g.div_(scale)
            z = z * scale
            ztz = z.T @ z
            g, m, s = self._update(x, g, z, ztz, device)
            loss = (
                sq_norm
                - 2 * float((z.double() * m.double()).sum())
                + float((ztz.double() * s.double()).sum())
            )
            losses.append(max(loss, 0.0))
            if loss < best["loss"] - self.tol:
                best, stale = {"loss": loss, "Z": z.clone(), "G": g.clone(), "iteration": it}, 0
            else:
                stale += 1
            bar.set_postfix(
                rel_err=f"{math.sqrt(max(loss, 0) / max(sq_norm, 1e-30)):.4f}", refresh=False
            )
            if stale >= self.patience:
                break
        seconds = time.perf_counter() - start
        rel = [math.sqrt(v / max(sq_norm, 1e-30)) for v in losses]
        report = {
            "loss_curve": losses,
            "relative_error_curve": rel,
            "iterations": len(losses),
            "best_iteration": best["iteration"],
            "relative_error": math.sqrt(max(best["loss"], 0.0) / max(sq_norm, 1e-30)),
            "seconds": seconds,
            "tokens": n,
            "rank": k,
            "sparsity": self.sparsity,
            "init": self.init,
            "seed": self.seed,
        }
        log.info(
            "snmf: k=%d, %d iterations in %.1f s, relative error %.4f",
            k,
            len(losses),
            seconds,
            report["relative_error"],
        )
        return {"Z": best["Z"].cpu(), "G": best["G"].cpu(), "report": report}  # a matching pair

    def _chunks(self, x: torch.Tensor, device: torch.device):
        for start in range(0, x.shape[0], self.chunk_size):
            yield start, x[start : start + self.chunk_size].to(device, torch.float32)

    def _statistics(self, x, g, device):
        m = torch.zeros(x.shape[1], g.shape[1], device=device)
        s = torch.zeros(g.shape[1], g.shape[1], device=device)
        for start, chunk in self._chunks(x, device):
            gc = g[start : start + chunk.shape[0]]
            m += chunk.T @ gc
            s += gc.T @ gc
        return m, s

    def _update(self, x, g, z, ztz, device):
        """Step 4 fused with the next iteration's X^T G and G^T G: one pass over X."""
        m = torch.zeros_like(z)
        s = torch.zeros_like(ztz)
        for start, chunk in self._chunks(x, device):
            stop = start + chunk.shape[0]
            gc = multiplicative_step(g[start:stop], chunk @ z, ztz)
            g[start:stop] = gc
            m += chunk.T @ gc
            s += gc.T @ gc
        return g, m, s

    def _init(self, x, k, gen, device):
        """G (n x k, >= 0) and a starting Z (used only when no iteration improves)."""
        n, d = x.shape
        if self.init == "random":  # as the paper's code: uniform G, Gaussian Z
            g = torch.rand(n, k, generator=gen).clamp_min(1e-6)
            z = torch.randn(d, k, generator=gen)
        elif self.init == "svd":  # Ding et al. eq. 17-18 on a randomized truncated SVD
            torch.manual_seed(self.seed)
            u, sv, v = torch.svd_lowrank(x.float(), q=min(k + 10, n, d), niter=4)
            root = sv[:k].sqrt()
            z = v[:, :k] * root
            g = (u[:, :k] * root).clamp_min(1e-6)
        else:  # kmeans: centroids as Z, one-hot assignments as G
            z, labels = _kmeans(x, k, gen, self.chunk_size, device)
            g = torch.full((n, k), 1e-6)
            g[torch.arange(n), labels.cpu()] = 1.0
            z = z.cpu()
        return g.to(device), z.to(device)


def _kmeans(x, k, gen, chunk, device, iters: int = 15):
    """Lloyd's k-means in token chunks; empty clusters are re-seeded from random tokens."""
    n = x.shape[0]
    centres = x[torch.randperm(n, generator=gen)[:k]].to(device, torch.float32)
    labels = torch.empty(n, dtype=torch.long, device=device)
    for _ in range(iters):
        c2 = centres.pow(2).sum(1)
        for start in range(0, n, chunk):
            block = x[start : start + chunk].to(device, torch.float32)
            labels[start : start + chunk] = (c2 - 2 * block @ centres.T).argmin(1)
        sums = torch.zeros_like(centres)
        for start in range(0, n, chunk):
            block = x[start : start + chunk].to(device, torch.float32)
            sums.index_add_(0, labels[start : start + chunk], block)
        counts = torch.bincount(labels, minlength=k).float()
        centres = sums / counts.clamp_min(1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            centres[empty] = x[torch.randint(0, n, (len(empty),), generator=gen)].to(
                device, torch.float32
            )
    return centres.T, labels


def make_features(z: torch.Tensor, method: str, hook: str, info: dict) -> SNMFFeatures:
    """Unit-norm directions from Z's columns; empty features are reported, not NaN."""
    norms = z.norm(dim=0)
    empty = (norms == 0).nonzero().flatten().tolist()
    if empty:
        log.warning(
            "%s: %d of %d features are empty (all-zero); their direction is zero",
            method,
            len(empty),
            z.shape[1],
        )
    directions = (z / norms.clamp_min(1e-30)).T
    info = {**info, "empty_features": empty}
    return SNMFFeatures(
        directions, method=method, hook=hook, info=info, extra={"Z": z.float().contiguous()}
    )

"""Hierarchical SNMF: features at several granularities, linked into a tree.

Level 1 factorizes the activations with the first rank (default 400),
A ~= Z1 Y1. Each further level factorizes the previous level's features,
Z(l) ~= Z(l+1) Y(l+1) with Y(l+1) >= 0 (ranks 200, 100, 50 by default), so a
coarse feature is a non-negative mixture basis of finer ones. Every level
uses the SNMF step of `featbench.methods.snmf` (winner-take-all sparsity included).

Edges: coarse feature j (parent) -> fine feature i (child) when
Y(l+1)[j, i] >= `edge_threshold` (0.15) x max_i' Y(l+1)[j, i'].

Optional joint fine-tuning (`finetune_iters` > 0) then refines the whole
product A ~= Z(L) Y(L) ... Y(1) with the Deep Semi-NMF multiplicative updates
(Trigeorgis et al. 2014), re-applying winner-take-all to Z(L); the finer
levels' features become the implied Z(l) = Z(L) Y(L) ... Y(l+1), which are
no longer exactly ceil(p d)-sparse.

Features of every level are returned together (coarsest last); `info`
holds the level slices and the edges, and `save` writes `tree.json` and a
small `tree.png` beside the artifact. `encode` is SNMF's per level;
`decode` reconstructs from the finest level's codes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import torch

from bench.core.storage import atomic_write, atomic_write_text
from bench.errors import ConfigError
from featbench.methods.base import ActivationSet, Features, GeneratorInfo, Method
from featbench.methods.snmf import (
    EPS,
    SNMF,
    SNMFFeatures,
    negative,
    nnls_codes,
    positive,
    winner_take_all,
)

log = logging.getLogger(__name__)


class HierarchicalFeatures(SNMFFeatures):
    def _levels(self) -> list[tuple[int, int]]:
        return [(lv["start"], lv["stop"]) for lv in self.info["levels"]]

    def encode(self, acts: ActivationSet | torch.Tensor) -> torch.Tensor:
        x = acts.acts if isinstance(acts, ActivationSet) else acts
        if self.info.get("encode") == "cosine":
            return super().encode(x)
        iters = int(self.info.get("encode_iters", 100))
        return torch.cat(
            [nnls_codes(x, self.extra["Z"][:, a:b], iters) for a, b in self._levels()], dim=1
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        a, b = self._levels()[0]
        return codes[:, a:b].float() @ self.extra["Z"][:, a:b].T

    def save(self, directory: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        directory = super().save(directory, provenance)
        tree = {"levels": self.info["levels"], "edges": self.info["edges"]}
        atomic_write_text(directory / "tree.json", json.dumps(tree, indent=1))
        atomic_write(directory / "tree.png", lambda tmp: _draw_tree(tree, tmp))
        return directory


def _draw_tree(tree: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = tree["levels"]
    position = {}
    for depth, level in enumerate(levels):
        size = level["stop"] - level["start"]
        for i in range(size):
            position[level["start"] + i] = ((i + 0.5) / size, depth)
    fig, ax = plt.subplots(figsize=(8, 1 + 0.8 * len(levels)), dpi=100)
    for edge in tree["edges"]:
        (x0, y0), (x1, y1) = position[edge["parent"]], position[edge["child"]]
        ax.plot([x0, x1], [y0, y1], color="0.6", linewidth=0.3)
    for depth, level in enumerate(levels):
        xs = [position[g][0] for g in range(level["start"], level["stop"])]
        ax.scatter(xs, [depth] * len(xs), s=4, zorder=3)
    ax.set_yticks(range(len(levels)), [f"k={lv['rank']}" for lv in levels])
    ax.set_xticks([])
    ax.set_title("hierarchical SNMF: parent -> child edges")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


@dataclass
class HierarchicalSNMF(Method):
    name: ClassVar[str] = "snmf_hier"

    ranks: list[int] = field(
        default_factory=lambda: [400, 200, 100, 50]
    )  # finest first, as the paper
    edge_threshold: float = 0.15  # child coefficient >= 0.15 x the parent's largest
    finetune_iters: int = 0  # joint fine-tuning of the product; 0 = levels fitted one by one
    sparsity: float = 0.01  # every level, as SNMF
    init: str = "random"
    max_iter: int = 500
    tol: float = 1e-4
    patience: int = 100
    reg: float = 1e-6
    seed: int = 42  # the run's seed, handed over by the job (Method.seeded)
    chunk_size: int = 8192
    device: str = "auto"
    encode: str = "nnls"
    encode_iters: int = 100

    def __post_init__(self) -> None:
        ranks = list(self.ranks)
        if not ranks or any(r < 1 for r in ranks) or any(b >= a for a, b in pairwise(ranks)):
            raise ConfigError(
                f"method.ranks={ranks}: must be positive and strictly decreasing (finest first)"
            )
        if self.finetune_iters < 0:
            raise ConfigError(f"method.finetune_iters={self.finetune_iters}: must be >= 0")
        self._snmf(ranks[0])  # validates the shared SNMF settings

    def bounded_rank(self) -> int:
        return self.ranks[0]  # a factorization's rank: at most min(tokens, width)

    def at_capacity(self, k: int, generator: GeneratorInfo | None = None) -> HierarchicalSNMF:
        """`ranks` <- [k, k // 2]: the finest level at the capacity, one coarser level of half
        (just [k] when k < 2). `sparsity` as SNMF's `at_capacity`: kept with capacity only,
        the generator's neuron density when it is given."""
        sparsity = self.sparsity if generator is None else generator.neuron_density
        return replace(self, ranks=[k, k // 2] if k >= 2 else [k], sparsity=sparsity)

    def _snmf(self, rank: int) -> SNMF:
        shared = {
            f.name: getattr(self, f.name)
            for f in fields(SNMF)
            if f.name not in ("rank", "massive_norm")
        }
        return SNMF(rank=rank, **shared)

    def fit(self, acts: ActivationSet) -> Features:
        x = acts.acts
        limit = min(x.shape)
        if self.ranks[0] > limit:
            raise ConfigError(
                f"method.ranks={list(self.ranks)}: the finest rank {self.ranks[0]} exceeds "
                f"min(tokens, width) = min({x.shape[0]}, {x.shape[1]}); choose ranks <= {limit}"
            )
        zs, ys, reports = [], [], []
        for level, rank in enumerate(self.ranks):
            data = x if level == 0 else zs[-1].T  # level l+1 factorizes level l's features
            out = self._snmf(rank).factorize(data)
            zs.append(out["Z"])
            ys.append(out["G"].T)  # rank x (tokens or previous rank), >= 0
            reports.append(out["report"])
        if self.finetune_iters:
            zs, ys = self._finetune(x, zs, ys)
        z_all = torch.cat(zs, dim=1)
        levels, edges, start = [], [], 0
        for rank in self.ranks:
            levels.append({"rank": rank, "start": start, "stop": start + rank})
            start += rank
        for level in range(1, len(self.ranks)):
            y = ys[level]  # parent rank x child rank
            top = y.max(dim=1, keepdim=True).values
            parents, children = ((y >= self.edge_threshold * top) & (top > 0)).nonzero(
                as_tuple=True
            )
            for p, c in zip(parents.tolist(), children.tolist(), strict=True):
                edges.append(
                    {
                        "parent": levels[level]["start"] + p,
                        "child": levels[level - 1]["start"] + c,
                        "coefficient": float(y[p, c]),
                    }
                )
        norms = z_all.norm(dim=0)
        empty = (norms == 0).nonzero().flatten().tolist()
        if empty:
            log.warning(
                "snmf_hier: %d of %d features are empty (all-zero); their direction is zero",
                len(empty),
                len(norms),
            )
        info = {
            "levels": levels,
            "edges": edges,
            "level_reports": reports,
            "finetune_iters": self.finetune_iters,
            "empty_features": empty,
            "encode": self.encode,
            "encode_iters": self.encode_iters,
        }
        log.info("snmf_hier: levels %s, %d edges", list(self.ranks), len(edges))
        directions = (z_all / norms.clamp_min(1e-30)).T
        return HierarchicalFeatures(
            directions, method=self.name, hook=acts.hook, info=info, extra={"Z": z_all}
        )

    def _finetune(self, x, zs, ys):
        """Deep Semi-NMF updates of A ~= Z_L Y_L ... Y_1 (X = A^T held as n x d)."""
        dev = zs[0].device
        ys = [y.clone() for y in ys]
        z_top = zs[-1].clone()
        n_levels = len(ys)

        def chain(lo, hi):  # Y_hi ... Y_lo (product of levels lo..hi, 0-based), or None if empty
            out = None
            for i in range(lo, hi + 1):
                out = ys[i] if out is None else ys[i] @ out
            return out

        for _ in range(self.finetune_iters):
            for i in range(n_levels):
                psi = z_top if i == n_levels - 1 else z_top @ chain(i + 1, n_levels - 1)  # d x k_i
                below = chain(0, i - 1)  # k_{i-1} x n, None for the first level
                a_below = _xt_times(
                    x, below.T if below is not None else None, self.chunk_size, dev
                )  # d x k_{i-1}|n
                numer_pos = psi.T @ a_below
                gram = psi.T @ psi
                hht = below @ below.T if below is not None else None
                y = ys[i]
                grown = y @ hht if hht is not None else y
                update = (positive(numer_pos) + negative(gram) @ grown) / (
                    negative(numer_pos) + positive(gram) @ grown + EPS
                )
                ys[i] = y * update.sqrt()
            full = chain(0, n_levels - 1)  # k_L x n
            m = _xt_times(x, full.T, self.chunk_size, dev)  # d x k_L
            z_top = winner_take_all(
                torch.linalg.solve(full @ full.T + torch.eye(full.shape[0]) * self.reg, m.T).T,
                self.sparsity,
            )
        zs = [
            z_top @ chain(i + 1, n_levels - 1) if i < n_levels - 1 else z_top
            for i in range(n_levels)
        ]
        return zs, ys


def _xt_times(x: torch.Tensor, right: torch.Tensor | None, chunk: int, device) -> torch.Tensor:
    """A @ right^T-like product X^T @ right (d x k) in token chunks; X^T itself when right is None."""
    if right is None:
        return x.float().T.to(device)
    out = torch.zeros(x.shape[1], right.shape[1], device=device)
    for start in range(0, x.shape[0], chunk):
        out += x[start : start + chunk].to(device, torch.float32).T @ right[start : start + chunk]
    return out

"""Alpha calibration: for each KL target, the steering strength alpha at which adding
alpha * unit(direction) at the hook, at every position, moves the next-token
distribution after the prompt by KL(P_base || P_steered) = target.

Two searches (`alpha_search`):

- `batched` (featbench's default): every round evaluates many candidate alphas in one
  batched forward pass, for every target and sign at once (`search_alpha`); a target
  is found when some candidate is within `tolerance` (<=) of it.
- `bisection` (the SNMF reference code's, `Intervener.find_alpha_for_kl_targets`): per
  target, `bisection_steps` halvings of `alpha_range`, all of them, whatever happens
  in between; a step whose KL is strictly within `tolerance` records its midpoint,
  so the alpha kept is the *last* in-tolerance midpoint, not the closest one. A target
  no step reaches is not found. The targets' bisections are independent; each step
  evaluates every target's midpoint in one batched pass (`bisect_alpha`), which
  changes the cost, not the alphas.

Negative steering (`negative_alpha`): `calibrated` searches the -1 sign on its own;
`mirrored` (the reference's) reuses -alpha of the + search with no KL check of its own.
Its KL is still measured once, for the rows (`kl_achieved`); it is not calibrated.

A target not found is returned with alpha None and its reason; the steering task
writes it as a row with that reason and counts it (`unreachable_targets`).
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

from bench.tasks.steering.kl import next_token_kl, unsteered

log = logging.getLogger(__name__)

SEARCHES = ("batched", "bisection")
NEGATIVES = ("calibrated", "mirrored")
#: (target index, sign) -> (signed alpha or None, KL at it or the closest KL, reason if not found)
Found = dict[tuple[int, int], tuple[float | None, float | None, str | None]]


class SearchSettings(Protocol):
    """What the searches read (the steering task has these fields)."""

    prompts: list[str]  # KL is averaged over these prompts' next-token distributions
    kl_targets: list[float]
    tolerance: float  # |KL - target| accepted
    batch_size: int  # steered rows per forward pass at least
    search_points: int  # batched: candidates per round
    search_rounds: int  # batched: refinement rounds after the first grid
    alpha_search: str  # batched | bisection
    negative_alpha: str  # calibrated | mirrored
    alpha_range: list[float]  # bisection: [low, high]
    bisection_steps: int  # bisection: halvings, all of them run


def calibrate(
    model, hook: str, direction: torch.Tensor, settings: SearchSettings, signs=(1, -1)
) -> tuple[Found, int]:
    """Alphas for every (target, sign in `signs`) by the settings' search, and the forward
    passes spent. With `negative_alpha=mirrored` only the + sign is searched and the -1
    sign takes -alpha (its KL measured, not calibrated)."""
    searched = (1,) if settings.negative_alpha == "mirrored" and 1 in signs else tuple(signs)
    if settings.alpha_search == "bisection":
        found, passes = {}, 0
        for sign in searched:
            mine, n = bisect_alpha(model, hook, direction, settings, sign)
            found.update(mine)
            passes += n
    else:
        found, passes = search_alpha(model, hook, direction, settings, signs=searched)
    if -1 in signs and -1 not in searched:
        mirrored, n = _mirror(model, hook, direction, settings, found)
        found.update(mirrored)
        passes += n
    return found, passes


def bisect_alpha(
    model, hook: str, direction: torch.Tensor, settings: SearchSettings, sign: int = 1
) -> tuple[Found, int]:
    """The reference's bisection for one sign, every target's step in one batched pass."""
    base = unsteered(model, hook, settings.prompts)
    targets = np.asarray(settings.kl_targets, dtype=float)
    low = np.full(len(targets), float(settings.alpha_range[0]))
    high = np.full(len(targets), float(settings.alpha_range[1]))
    hit: list[tuple[float, float] | None] = [None] * len(targets)
    closest: list[tuple[float, float] | None] = [None] * len(targets)  # (|kl - t|, mid, kl)
    passes = 0
    for _ in range(settings.bisection_steps):
        mids = (low + high) / 2.0
        unique = sorted(set(mids.tolist()))  # targets on the same path share a forward row
        vectors = torch.stack([sign * m * direction for m in unique])
        kls, n = next_token_kl(
            model, hook, settings.prompts, vectors, max(settings.batch_size, len(unique)), base
        )
        passes += n
        kl_of = dict(zip(unique, kls.tolist(), strict=True))
        for t, (mid, target) in enumerate(zip(mids.tolist(), targets.tolist(), strict=True)):
            kl = kl_of[mid]
            if abs(kl - target) < settings.tolerance:
                hit[t] = (mid, kl)  # overwritten by every later hit: the last one is kept
            if closest[t] is None or abs(kl - target) < closest[t][0]:
                closest[t] = (abs(kl - target), mid, kl)
            if kl < target:
                low[t] = mid
            else:
                high[t] = mid
    found: Found = {}
    lo, hi = settings.alpha_range
    for t, target in enumerate(targets.tolist()):
        if hit[t] is not None:
            found[(t, sign)] = (sign * hit[t][0], hit[t][1], None)
        else:
            _, mid, kl = closest[t]
            found[(t, sign)] = (
                None,
                kl,
                f"KL target {target} not within tolerance "
                f"{settings.tolerance} in {settings.bisection_steps} bisection "
                f"steps on alpha [{lo:g}, {hi:g}] (closest KL {kl:.4g} at "
                f"alpha {sign * mid:.4g})",
            )
    return found, passes


def _mirror(model, hook, direction, settings: SearchSettings, found: Found) -> tuple[Found, int]:
    """The -1 sign at -alpha of every + result; its KL measured in one pass, not searched."""
    out: Found = {}
    hits = [(t, alpha) for (t, sign), (alpha, _, _) in found.items() if sign == 1 and alpha]
    for (t, sign), (alpha, _, reason) in found.items():
        if sign == 1 and alpha is None:
            out[(t, -1)] = (None, None, f"mirrors the + sign, whose alpha was not found ({reason})")
    if not hits:
        return out, 0
    vectors = torch.stack([-alpha * direction for _, alpha in hits])
    kls, passes = next_token_kl(
        model, hook, settings.prompts, vectors, max(settings.batch_size, len(hits))
    )
    for (t, alpha), kl in zip(hits, kls.tolist(), strict=True):
        out[(t, -1)] = (-alpha, kl, None)
    return out, passes


def search_alpha(model, hook: str, direction: torch.Tensor, settings, signs=(1, -1)):
    """featbench's batched search. For each (target index, sign in `signs`): (alpha,
    achieved KL, reason if not found); also the forward passes spent.

    Round 0 evaluates a geometric grid of magnitudes (relative to the typical
    activation norm at the hook) for every sign in one batched pass. Each later
    round puts `search_points` candidates inside the brackets of the targets
    not yet within tolerance, again in one pass, so every round shrinks every
    bracket about tenfold.
    """
    base = unsteered(model, hook, settings.prompts)  # once per search, not once per round
    scale = float(np.mean([norm for _, _, norm in base])) or 1.0
    targets = np.asarray(settings.kl_targets, dtype=float)
    seen = {sign: [(0.0, 0.0)] for sign in signs}  # sign -> [(magnitude, kl)]
    passes = 0

    def evaluate(cands: list[tuple[int, float]]) -> None:
        nonlocal passes
        vecs = torch.stack([sign * m * direction for sign, m in cands])
        kls, n = next_token_kl(
            model, hook, settings.prompts, vecs, max(settings.batch_size, len(cands)), base
        )
        passes += n
        for (sign, m), kl in zip(cands, kls.tolist(), strict=True):
            seen[sign].append((m, kl))

    grid = scale * np.logspace(-2, 2, settings.search_points // 2)
    evaluate([(sign, float(m)) for sign in signs for m in grid])
    found: Found = {}
    for _ in range(settings.search_rounds + 1):
        brackets = []
        for sign in signs:
            pts = sorted(seen[sign])
            for t, target in enumerate(targets):
                if (t, sign) in found:
                    continue
                m_best, kl_best = min(pts, key=lambda p: abs(p[1] - target))
                if abs(kl_best - target) <= settings.tolerance:
                    found[(t, sign)] = (sign * m_best, kl_best, None)
                    continue
                upper = next((i for i, (_, kl) in enumerate(pts) if kl >= target), None)
                if upper is None:
                    m_max, kl_max = max(pts, key=lambda p: p[1])
                    found[(t, sign)] = (
                        None,
                        kl_max,
                        f"KL target {target} not reachable: "
                        f"largest KL {kl_max:.4g} at alpha {sign * m_max:.4g}",
                    )
                    continue
                brackets.append((sign, pts[upper - 1][0], pts[upper][0]))
        if not brackets:
            break
        brackets = list(dict.fromkeys(brackets))  # targets sharing a bracket refine it once
        per = max(1, settings.search_points // len(brackets))
        evaluate(
            [
                (sign, float(m))
                for sign, lo, hi in brackets
                for m in np.linspace(lo, hi, per + 2)[1:-1]
            ]
        )
    for sign in signs:
        pts = sorted(seen[sign])
        for t, target in enumerate(targets):
            if (t, sign) not in found:
                m_best, kl_best = min(pts, key=lambda p: abs(p[1] - target))
                found[(t, sign)] = (
                    None,
                    kl_best,
                    f"KL target {target} not within tolerance "
                    f"{settings.tolerance} after {passes} passes (closest {kl_best:.4g})",
                )
    return found, passes

"""The steering task's settings, declared once: `SteeringSettings` (every field, its default
and why), the protocol presets (`PROTOCOL_VALUES`, the one place that maps a protocol to
its values) and the checks. `conf/task/steering.yaml` repeats the fields for the command
line, and `tests/test_steering_units.py` checks that it says what this class says.

`protocol` is a preset. Every field named in `PROTOCOL_VALUES` that is left at
`protocol` (the one sentinel for "the protocol's value") takes its protocol's value:
featbench's under `concept` and `feature`, the SNMF reference code's under `paper`. A
value set explicitly wins, so a user can remove the paper's deviations from featbench's
defaults (or the other way round) one at a time. `null` keeps its own meaning where a
field has one (`top_p: null` is top-k only, `max_features: null` every feature,
`top_tokens: null` the description kind's count). docs/paper-protocol.md explains each
value.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from bench.errors import ConfigError
from bench.judges.base import RATING_FORMATS
from bench.stats import RESAMPLES
from bench.tasks.base import PROTOCOL  # a field left to the protocol: PROTOCOL_VALUES gives it
from bench.tasks.descriptions import INPUT_CENTRIC, KINDS, SIGN_POLICIES
from bench.tasks.steering.calibrate import NEGATIVES, SEARCHES
from bench.tasks.steering.generate import ENGINES, JUDGED_TEXTS

log = logging.getLogger(__name__)

PROTOCOLS = ("concept", "feature", "paper")
DIRECTIONS = ("feature", "generated_diffmean")  # what is steered for each unit
FAILURE_POLICIES = ("missing", "zero")
#: items a description lists or its writer reads, per kind (`top_tokens: null`)
TOP_BY_KIND = {"tokens": 8, "output_centric": 8, "summary": 8, "input_centric": 10,
               "output_summary": 25}  # fmt: skip

#: field -> (featbench's value under `concept` and `feature`, the paper's value). The
#: paper's are the reference code's (github ordavid-s/snmf-mlp-decomposition at ab58c78).
PROTOCOL_VALUES: dict[str, tuple[Any, Any]] = {
    # reference: TL sample_logits(top_k=30, top_p=0.3) applies top-p only without top-k, so
    # its text is top-k 30 at T=1; featbench keeps a nucleus of 0.3 inside the top 30
    "top_p": (0.3, None),
    # reference: a fixed loop of 50 steps; featbench stops a row at EOS (nothing to judge after)
    "stop_at_eos": (True, False),
    # reference: 20 bisection steps on [1, 2000]; featbench: batched rounds, ~7x fewer passes
    "alpha_search": ("batched", "bisection"),
    # reference: -1 reuses -alpha of the + search; featbench calibrates each sign to the target
    "negative_alpha": ("calibrated", "mirrored"),
    # reference: TL to_string of BOS + prompt + continuation; featbench: the continuation
    "judged_text": ("continuation", "bos_prompt_continuation"),
    # reference: 0 after the last failed try; featbench: a missing value with its reason
    "judge_failure": ("missing", "zero"),
    # reference: two tries per rating; featbench asks once (transport errors retry anyway)
    "judge_attempts": (1, 2),
    # reference: the first "Rating: [[n]]" or bare "Rating: n"; featbench: the last "[[n]]"
    "rating_format": ("strict", "reference"),
    # reference: LLM-written descriptions; featbench: top train tokens, which every judge reads
    "description": ("tokens", "input_centric"),
    # reference: one input-centric description for both signs; featbench: the + sign only
    "description_signs": ("described", "both"),
    # reference: every feature; featbench's feature protocol: 3 (CPU time), null = all
    "max_features": (3, None),
    # reference (Gemma): SNMF z steered as ln2_post(b_out + z W_out) at hook_mlp_out;
    # featbench steers where the features live. No effect on models without ln2_post.
    "post_norm_mlp_out": (False, True),
    # reference (DiffMean): HF tokenizer output, BOS included where it adds one; featbench's
    # activation rows never hold BOS
    "diffmean_bos": (False, True),
}


@dataclass
class SteeringSettings:
    """Every setting of the steering task (`featbench.tasks.steering.Steering` is these plus
    the protocol). Fields left at `protocol` take the protocol's value when built."""

    # concept: for each concept, every method's feature with the best train-split AUROC for it
    # (DiffMean: its own direction), judged against the concept's label, so methods pair over
    # concepts; feature: sampled features with their own descriptions; paper: the SNMF
    # reference code's choices (PROTOCOL_VALUES), on every feature.
    protocol: str = "concept"
    prompts: list[str] = field(default_factory=lambda: ["I think that"])  # the paper's prompt
    kl_targets: list[float] = field(  # the paper's KL grid
        default_factory=lambda: [0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5]
    )
    tolerance: float = 0.01  # |KL - target| accepted by the alpha search (the paper's)
    concepts: int | None = 8  # concept protocol: a seeded sample of concepts (null = all of them)
    concept_seed: int = 0  # fixed, not the run's seed: every method and seed steers the same ones
    max_features: int | str | None = PROTOCOL  # features drawn with the run's seed; null = all
    direction: str = "feature"  # feature | generated_diffmean (the paper's DiffMean arm)
    samples: int = 8  # continuations per (feature, target, sign), as the paper
    max_new_tokens: int = 50  # as the paper
    top_k: int = 30  # the paper's
    top_p: float | str | None = PROTOCOL  # nucleus inside the top k; null = top-k only
    temperature: float = 1.0  # the paper's: plain sampling within top-k / top-p
    stop_at_eos: bool | str = PROTOCOL  # stop a row at its first EOS
    batch_size: int = 128  # rows per generation batch, of any units: 1.3x the tok/s of 64 on CPU
    engine: str = "lean"  # lean: the lean decoder (same weights and hook); reference: TL forward
    baseline_samples: int = 16  # unsteered continuations the concept judge compares against
    description: str = PROTOCOL  # one kind for every method (bench/tasks/descriptions.py)
    description_signs: str = PROTOCOL  # described | both
    top_tokens: int | None = None  # tokens listed / read by the writer (null: the kind's)
    alpha_search: str = PROTOCOL  # batched | bisection
    negative_alpha: str = PROTOCOL  # calibrated | mirrored
    alpha_range: list[float] = field(  # bisection's [low, high] of alpha, the paper's
        default_factory=lambda: [1.0, 2000.0]
    )
    bisection_steps: int = 20  # the paper's: all 20 run, the last in-tolerance midpoint kept
    search_points: int = 48  # batched: candidate alphas per search round (one batched pass)
    search_rounds: int = 6  # batched: refinement rounds after the first grid
    judged_text: str = PROTOCOL  # continuation | bos_prompt_continuation
    judge_failure: str = PROTOCOL  # missing | zero
    judge_attempts: int | str = PROTOCOL  # tries per rating
    rating_format: str = PROTOCOL  # strict | reference: how ratings are read
    post_norm_mlp_out: bool | str = PROTOCOL  # Gemma: steer mlp_post features at hook_mlp_out
    diffmean_bos: bool | str = PROTOCOL  # generated DiffMean: include the BOS row
    bootstrap: int = RESAMPLES  # resamples for the 95% intervals

    def __post_init__(self) -> None:
        resolve(self)  # every setting left to the protocol takes the protocol's value
        check(self)
        log.info("steering protocol %s: %s", self.protocol, json.dumps(self.resolved()))

    def resolved(self) -> dict[str, Any]:
        """The protocol-dependent settings as resolved (for the log and the rows)."""
        return {key: getattr(self, key) for key in (*PROTOCOL_VALUES, "direction", "top_tokens")}


def resolve(task: Any) -> None:
    """Set every field left at `protocol` to the protocol's value, and `top_tokens` left at
    None to its description kind's."""
    if task.protocol not in PROTOCOLS:
        raise ConfigError(
            f"task.steering.protocol={task.protocol!r}: must be one of {list(PROTOCOLS)}"
        )
    column = 1 if task.protocol == "paper" else 0
    for key, values in PROTOCOL_VALUES.items():
        if getattr(task, key) == PROTOCOL:
            setattr(task, key, values[column])
    if task.top_tokens is None:
        task.top_tokens = TOP_BY_KIND.get(task.description, 8)


def check(task: Any) -> None:
    """Refuse a resolved value that is not allowed, naming it and what is."""
    rng = task.alpha_range
    checks = {
        "prompts": (task.prompts and all(p.strip() for p in task.prompts), "a non-empty list of non-empty strings"),
        "kl_targets": (task.kl_targets and all(t > 0 for t in task.kl_targets), "a non-empty list of positive numbers"),
        "max_features": (task.max_features is None or (isinstance(task.max_features, int) and task.max_features >= 1), ">= 1, null (all) or protocol"),
        "concepts": (task.concepts is None or task.concepts >= 1, ">= 1 or null (all)"),
        "direction": (task.direction in DIRECTIONS, f"one of {list(DIRECTIONS)}"),
        "samples": (task.samples >= 2, ">= 2 (the held-out score splits them in halves)"),
        "tolerance": (task.tolerance > 0, "> 0"),
        "max_new_tokens": (task.max_new_tokens >= 1, ">= 1"),
        "top_k": (task.top_k >= 1, ">= 1"),
        "top_p": (task.top_p is None or (isinstance(task.top_p, float | int) and 0 < task.top_p <= 1), "in (0, 1], null (top-k only) or protocol"),
        "temperature": (task.temperature >= 0, ">= 0 (0 = greedy)"),
        "stop_at_eos": (isinstance(task.stop_at_eos, bool), "true, false or protocol"),
        "batch_size": (task.batch_size >= 1, ">= 1"),
        "engine": (task.engine in ENGINES, f"one of {list(ENGINES)}"),
        "baseline_samples": (task.baseline_samples >= 1, ">= 1"),
        "description": (task.description in KINDS, f"one of {list(KINDS)}"),
        "description_signs": (task.description_signs in SIGN_POLICIES, f"one of {list(SIGN_POLICIES)}"),
        "top_tokens": (task.top_tokens >= 1, ">= 1 or null (the kind's)"),
        "alpha_search": (task.alpha_search in SEARCHES, f"one of {list(SEARCHES)}"),
        "negative_alpha": (task.negative_alpha in NEGATIVES, f"one of {list(NEGATIVES)}"),
        "alpha_range": (len(rng) == 2 and 0 <= rng[0] < rng[1], "[low, high] with 0 <= low < high"),
        "bisection_steps": (task.bisection_steps >= 1, ">= 1"),
        "search_points": (task.search_points >= 4, ">= 4"),
        "judged_text": (task.judged_text in JUDGED_TEXTS, f"one of {list(JUDGED_TEXTS)}"),
        "judge_failure": (task.judge_failure in FAILURE_POLICIES, f"one of {list(FAILURE_POLICIES)}"),
        "judge_attempts": (isinstance(task.judge_attempts, int) and task.judge_attempts >= 1, ">= 1 or protocol"),
        "rating_format": (task.rating_format in RATING_FORMATS, f"one of {list(RATING_FORMATS)} or protocol"),
        "post_norm_mlp_out": (isinstance(task.post_norm_mlp_out, bool), "true, false or protocol"),
        "diffmean_bos": (isinstance(task.diffmean_bos, bool), "true, false or protocol"),
        "bootstrap": (task.bootstrap >= 1, ">= 1"),
    }  # fmt: skip
    for key, (ok, allowed) in checks.items():
        if not ok:
            raise ConfigError(f"task.steering.{key}={getattr(task, key)!r}: must be {allowed}")
    if task.direction == "generated_diffmean" and (
        task.protocol == "concept" or task.description not in INPUT_CENTRIC
    ):
        raise ConfigError(
            f"task.steering.direction=generated_diffmean writes sentences from each feature's "
            f"input-centric description: it needs protocol feature or paper (got "
            f"{task.protocol}) and description one of {[k for k in INPUT_CENTRIC if k in KINDS]} "
            f"(got {task.description})"
        )

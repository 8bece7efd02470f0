"""The steering task's settings: the protocol presets and the checks.

`protocol` is a preset. Every field of `featbench.tasks.steering.Steering` named in
`PROTOCOL_VALUES` that is left at null (at `protocol` for `top_p` and `max_features`,
whose null means "top-k only" and "every feature") takes its protocol's value:
featbench's under `concept` and `feature`, the SNMF reference code's under `paper`.
A value set explicitly wins, so a user can remove the paper's deviations from
featbench's defaults (or the other way round) one at a time.
docs/paper-protocol.md explains each value.
"""

from __future__ import annotations

from typing import Any

from bench.alpha_search import NEGATIVES, SEARCHES
from bench.descriptions import INPUT_CENTRIC, KINDS, SIGN_POLICIES
from bench.errors import ConfigError
from bench.judges.base import RATING_FORMATS
from bench.steer import ENGINES, JUDGED_TEXTS

PROTOCOLS = ("concept", "feature", "paper")
DIRECTIONS = ("feature", "generated_diffmean")  # what is steered for each unit
FAILURE_POLICIES = ("missing", "zero")
PROTOCOL = "protocol"  # top_p / max_features: "the protocol's value" (their null means something)
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


def resolve(task: Any) -> None:
    """Set every field left to the protocol (None, or PROTOCOL for top_p / max_features)
    to the protocol's value, and `top_tokens` left at None to its description kind's."""
    if task.protocol not in PROTOCOLS:
        raise ConfigError(
            f"task.steering.protocol={task.protocol!r}: must be one of {list(PROTOCOLS)}"
        )
    column = 1 if task.protocol == "paper" else 0
    for key, values in PROTOCOL_VALUES.items():
        unset = PROTOCOL if key in ("top_p", "max_features") else None
        if getattr(task, key) == unset:
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
        "stop_at_eos": (isinstance(task.stop_at_eos, bool), "true, false or null (the protocol's)"),
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
        "judge_attempts": (isinstance(task.judge_attempts, int) and task.judge_attempts >= 1, ">= 1 or null"),
        "rating_format": (task.rating_format in RATING_FORMATS, f"one of {list(RATING_FORMATS)} or null"),
        "post_norm_mlp_out": (isinstance(task.post_norm_mlp_out, bool), "true, false or null"),
        "diffmean_bos": (isinstance(task.diffmean_bos, bool), "true, false or null"),
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

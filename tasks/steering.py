"""Causal steering: push the model along a feature and judge what it writes.

The SNMF paper's protocol, made explicit, in the order `evaluate` runs it:

1. **Select**: `max_features` features drawn with the run's seed (`select_features`).
2. **Describe**: every feature of every method gets the same kind of description
   (`description`, see `bench/descriptions.py`). An input-centric description
   (`tokens`, `summary`) describes the feature's positive side, so only sign +1
   is steered and judged; `output_centric` has one description per sign and
   each sign is judged against its own.
3. **Calibrate**: for each KL target and judged sign, alpha such that adding
   alpha * unit(direction) at the feature's hook, at every position, moves the
   next-token distribution after the prompt by KL(P_base || P_steered) = target
   (within `tolerance`), by a batched search (`bench.steer.search_alpha`).
4. **Generate**: `samples` continuations per (feature, target, sign), batched
   with a KV cache; each sample draws from its own seed.
5. **Judge**: concept (against the description of that sign) and fluency, 0-2;
   the sample's `steering_score` is their harmonic mean. An empty generation
   scores 0 without asking the judge.
6. **Aggregate** (`aggregate`, on plain rows): per feature, the headline
   `heldout_steering_score` (target and sign chosen on even samples, reported on
   odd ones) and the paper's `best_kl_steering_score` (best over targets on all
   samples); summary rows with 95% bootstrap intervals over features.

A feature that fails to steer (zero-norm direction, every KL target unreachable,
every generation empty) scores 0 with its reason; a judge failure is a missing
value, counted in `judge_failures`. Each finished feature is checkpointed in the
job's folder (`checkpoints/steering/feature_<i>.json`), so a killed job resumes
at the next feature; run.py removes the checkpoints once `metrics.parquet` exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.checkpoints import Checkpoints
from bench.descriptions import KINDS, Describer, Description, check_kind
from bench.errors import ConfigError
from bench.judges.base import Judge, Judgement
from bench.stats import RESAMPLES, mean_estimate
from bench.steer import ENGINES, generate, search_alpha
from methods.base import Features
from tasks.base import Task, TaskData

log = logging.getLogger(__name__)

HELDOUT, BEST_KL = "heldout_steering_score", "best_kl_steering_score"
#: values of the `failure` column: why a row holds no judged score, or a forced 0
ZERO_NORM, UNREACHABLE, EMPTY, UNDESCRIBED = (
    "zero_norm", "unreachable", "empty_generation", "no_description")  # fmt: skip
#: bumped when a checkpoint's content changes meaning, so old checkpoints are not reused
CHECKPOINT_VERSION = "steering-2"
EMPTY_REASON = "empty generation"


@dataclass
class Steering(Task):
    name: ClassVar[str] = "steering"
    needs_judge: ClassVar[bool] = True

    prompts: list[str] = field(default_factory=lambda: ["I think that"])  # the paper's prompt
    kl_targets: list[float] = field(  # the paper's KL grid
        default_factory=lambda: [0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5]
    )
    tolerance: float = 0.01  # |KL - target| accepted by the alpha search
    max_features: int = 3  # ~40 s per feature on a 2-core CPU: the 4-method default < 15 min
    samples: int = 8  # continuations per (feature, target, sign), as the paper
    max_new_tokens: int = 50  # as the paper
    top_k: int = 30  # the paper's sampling settings
    top_p: float = 0.3
    temperature: float = 1.0
    batch_size: int = 128  # sequences per generation batch: one feature's rows at once
    engine: str = "lean"  # bench.decode: same weights and hook, faster; reference: TL forward
    baseline_samples: int = 16  # unsteered continuations the concept judge compares against
    description: str = "tokens"  # one kind for every method: top train tokens work for all
    top_tokens: int = 8  # tokens listed in token-based descriptions
    search_points: int = 48  # candidate alphas per search round (one batched pass)
    search_rounds: int = 6  # refinement rounds after the first grid
    bootstrap: int = RESAMPLES  # resamples for the 95% intervals

    def __post_init__(self) -> None:
        checks = {
            "prompts": (self.prompts and all(p.strip() for p in self.prompts), "a non-empty list of non-empty strings"),
            "kl_targets": (self.kl_targets and all(t > 0 for t in self.kl_targets), "a non-empty list of positive numbers"),
            "max_features": (self.max_features >= 1, ">= 1"),
            "samples": (self.samples >= 2, ">= 2 (the held-out score splits them in halves)"),
            "tolerance": (self.tolerance > 0, "> 0"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "top_k": (self.top_k >= 1, ">= 1"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "temperature": (self.temperature >= 0, ">= 0 (0 = greedy)"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "engine": (self.engine in ENGINES, f"one of {list(ENGINES)}"),
            "baseline_samples": (self.baseline_samples >= 1, ">= 1"),
            "description": (self.description in KINDS, f"one of {list(KINDS)}"),
            "search_points": (self.search_points >= 4, ">= 4"),
            "bootstrap": (self.bootstrap >= 1, ">= 1"),
        }  # fmt: skip
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"task.steering.{key}={getattr(self, key)!r}: must be {allowed}")

    def check_judge(self, judge: Judge | None) -> None:
        """Refuse a judge these settings cannot use (call before the model loads)."""
        if judge is None:
            raise ConfigError("task steering needs a judge; judge=none. Use judge=offline.")
        check_kind(self.description, judge)

    # --- the protocol ----------------------------------------------------------

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        judge: Judge | None = data.judge
        self.check_judge(judge)
        judge.bind(model)
        chosen = select_features(len(features), self.max_features, data.seed)
        norms = features.directions.norm(dim=1)
        unit = features.directions / norms[:, None].clamp_min(1e-12)
        store = Checkpoints(data.output_dir / "checkpoints" / "steering", data.config_hash,
                            version=CHECKPOINT_VERSION)  # fmt: skip
        done = {f: store.load(f, unit[f]) for f in chosen}
        todo = [f for f in chosen if done[f] is None]
        train = data.activations.subset(data.dataset.indices("train"))
        describe = Describer(self.description, model, features, train, judge, todo, unit,
                             self.top_tokens)  # fmt: skip
        baseline = self._baseline(model, features.hook, unit.shape[1], data.seed) if todo else []
        resumed: dict[str, float] = {}
        for f in tqdm(chosen, desc="steering", unit="feature", leave=False):
            if done[f] is not None:
                for k, v in done[f]["judge_stats"].items():
                    resumed[k] = resumed.get(k, 0.0) + v
                continue
            before = judge.stats()
            result = self._steer_feature(model, features.hook, f, unit[f], float(norms[f]),
                                         describe(f), baseline, judge, data.seed)  # fmt: skip
            result["judge_stats"] = {k: v - before.get(k, 0.0) for k, v in judge.stats().items()}
            store.save(f, unit[f], result)
            done[f] = result
        stats = judge.stats()
        stats.update({k: stats.get(k, 0.0) + v for k, v in resumed.items()})
        rows = [row for f in chosen for row in done[f]["rows"]]
        rows += aggregate(rows, chosen, passes={f: done[f]["passes"] for f in chosen},
                          judge_stats=stats, seed=data.seed, n_resamples=self.bootstrap)  # fmt: skip
        for row in rows:
            row.setdefault("judge", type(judge).name or type(judge).__name__.lower())
            row.setdefault("description", self.description)
        return rows

    def _steer_feature(self, model, hook, f, direction, norm, desc: Description, baseline,
                       judge, seed) -> dict:  # fmt: skip
        """Calibrate, generate and judge one feature: its rows and search passes."""
        if not norm > 1e-12:  # NaN too
            why = "zero-norm direction" if np.isfinite(norm) else "non-finite direction"
            return {"rows": [_failure(f, desc, ZERO_NORM, why)], "passes": 0}
        if not desc.texts:
            return {"rows": [_failure(f, desc, UNDESCRIBED, desc.reason)], "passes": 0}
        found, passes = search_alpha(model, hook, direction, self, signs=desc.signs)
        rows, jobs = [], []  # jobs: (target index, sign, alpha, kl)
        for (t, sign), (alpha, kl, reason) in sorted(found.items()):
            if alpha is None:
                rows.append(_failure(f, desc, UNREACHABLE, reason, self.kl_targets[t], sign,
                                     kl_achieved=kl))  # fmt: skip
            else:
                jobs.append((t, sign, float(alpha), float(kl)))
        specs = [(prompt, alpha * direction, (seed, f + 1, t, sign + 1, s))
                 for t, sign, alpha, _ in jobs for s, prompt in enumerate(self._sample_prompts())]  # fmt: skip
        texts = generate(model, hook, specs, self) if specs else []
        for sign in desc.signs:
            mine = [(j, job) for j, job in enumerate(jobs) if job[1] == sign]
            samples = [(job, s, texts[j * self.samples + s])
                       for j, job in mine for s in range(self.samples)]  # fmt: skip
            rows += self._judge(f, desc, sign, samples, baseline, judge)
        return {"rows": rows, "passes": passes}

    def _judge(self, f, desc: Description, sign, samples, baseline, judge) -> list[dict]:
        """Rows of one sign's samples, each judged against that sign's description;
        an empty text scores 0 unjudged (the steering broke the model, not the judge)."""
        description = desc.texts[sign]
        prompts = [self.prompts[s % len(self.prompts)] for _, s, _ in samples]
        asked = [i for i, (_, _, text) in enumerate(samples) if text.strip()]
        empty = Judgement(0.0, EMPTY_REASON)
        concept, fluency = [empty] * len(samples), [empty] * len(samples)
        if asked:
            texts = [samples[i][2] for i in asked]
            judged_c = judge.concept(texts, description, baseline, kind=desc.kind)
            judged_f = _fluency(judge, texts, [prompts[i] for i in asked])
            for i, c, fl in zip(asked, judged_c, judged_f, strict=True):
                concept[i], fluency[i] = c, fl
        rows = []
        for i, ((t, _, alpha, kl), s, text) in enumerate(samples):
            common = {"alpha": alpha, "kl_achieved": kl, "sample": s, "prompt": prompts[i],
                      "text": text, "description_text": description,
                      "failure": None if text.strip() else EMPTY}  # fmt: skip
            score = steering_score(concept[i].score, fluency[i].score)
            reasons = "; ".join(
                dict.fromkeys(r for r in (concept[i].reason, fluency[i].reason) if r)
            )
            for metric, value, reason in (("concept_score", concept[i].score, concept[i].reason),
                                          ("fluency_score", fluency[i].score, fluency[i].reason),
                                          ("steering_score", score, reasons or None)):  # fmt: skip
                rows.append(_row(f, desc.concept, metric, value, self.kl_targets[t], sign,
                                 reason=reason, **common))  # fmt: skip
        return rows

    def _sample_prompts(self) -> list[str]:
        return [self.prompts[s % len(self.prompts)] for s in range(self.samples)]

    def _baseline(self, model, hook: str, d: int, seed: int) -> list[str]:
        """Unsteered continuations, which the offline concept judge compares against."""
        zero = torch.zeros(d)
        specs = [(self.prompts[s % len(self.prompts)], zero, (seed, 0, 0, 0, s))
                 for s in range(self.baseline_samples)]  # fmt: skip
        return generate(model, hook, specs, self)


def select_features(n_features: int, max_features: int, seed: int) -> list[int]:
    """A seeded uniform sample of feature indices (all when there are few), sorted."""
    if n_features <= max_features:
        return list(range(n_features))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_features, size=max_features, replace=False).tolist())


def steering_score(concept: float | None, fluency: float | None) -> float | None:
    """Harmonic mean of the two 0-2 scores; 0 when either is 0, missing when either is."""
    if concept is None or fluency is None:
        return None
    if concept == 0 or fluency == 0:
        return 0.0
    return 2 * concept * fluency / (concept + fluency)


def _fluency(judge: Judge, texts: list[str], prompts: list[str]) -> list[Judgement]:
    out: list[Judgement | None] = [None] * len(texts)
    for prompt in dict.fromkeys(prompts):
        where = [i for i, p in enumerate(prompts) if p == prompt]
        for i, j in zip(where, judge.fluency([texts[i] for i in where], prompt), strict=True):
            out[i] = j
    return out  # type: ignore[return-value]


def _row(f, concept, metric, value, kl_target, sign, **extra) -> dict:
    return {"feature": f, "concept": concept, "metric": metric, "value": value,
            "kl_target": kl_target, "sign": sign, **extra}  # fmt: skip


def _failure(f, desc: Description, failure, reason, kl_target=None, sign=None, **extra) -> dict:
    """A sample-less `steering_score` row saying why nothing was generated or judged."""
    return _row(f, desc.concept, "steering_score", None, kl_target, sign, sample=None,
                failure=failure, reason=reason, **extra)  # fmt: skip


# --- aggregation: plain rows in, per-feature and summary rows out -------------------


def aggregate(rows: list[dict], chosen: list[int], *, passes: dict[int, int] | None = None,
              judge_stats: dict[str, float] | None = None, seed: int = 0,
              n_resamples: int = RESAMPLES) -> list[dict]:  # fmt: skip
    """Per-feature `heldout_steering_score` and `best_kl_steering_score`, then the
    summary rows, from the task's sample rows and failure rows (see `_failure`).

    Held-out: the (KL target, sign) with the best mean on even samples, reported
    as its mean on odd samples. Best-KL: the best mean on all samples (the
    paper's, optimistic). Ties go to the smaller KL target, then the + sign. A
    failed feature scores 0 in both with its reason; a feature whose judgements
    are all missing is missing. `concept_score` and `fluency_score` summarize
    the held-out samples: each feature's reported half at its chosen target.
    """
    by_feature: dict[int, list[dict]] = {f: [] for f in chosen}
    for r in rows:
        if r.get("feature") in by_feature:
            by_feature[r["feature"]].append(r)
    out, heldout_parts, failed = [], {}, {}
    for f in chosen:
        mine = by_feature[f]
        samples = [r for r in mine if r.get("sample") is not None]
        scores: dict[tuple, dict[int, float | None]] = {}
        for r in samples:
            if r["metric"] == "steering_score":
                scores.setdefault((r["kl_target"], r["sign"]), {})[r["sample"]] = r["value"]
        value, reason = _failed(mine, samples)
        concept = next((r.get("concept") for r in mine), None)
        for metric, pick, report in ((HELDOUT, _even, _odd), (BEST_KL, _any, _any)):
            if not scores:  # nothing generated: a failure (0) or a missing description
                out.append(_row(f, concept, metric, value, None, None, reason=reason, n=0))
                continue
            v, key, n, why = _select(scores, pick, report)
            out.append(
                _row(f, concept, metric, v, *(key or (None, None)), reason=reason or why, n=n)
            )
            if metric == HELDOUT and key is not None:
                heldout_parts[f] = [r for r in samples if (r["kl_target"], r["sign"]) == key
                                    and _odd(r["sample"])]  # fmt: skip
        if value == 0.0:
            failed[f] = reason
    return out + _summary(out, rows, chosen, heldout_parts, failed, passes or {},
                          judge_stats or {}, seed, n_resamples)  # fmt: skip


def _even(s: int) -> bool:
    return s % 2 == 0


def _odd(s: int) -> bool:
    return s % 2 == 1


def _any(s: int) -> bool:
    return True


def _failed(mine: list[dict], samples: list[dict]) -> tuple[float | None, str | None]:
    """(0.0, reason) for a feature that failed to steer, (None, reason) for one that
    could not be judged at all, (None, None) otherwise."""
    kinds = {r.get("failure") for r in mine if r.get("sample") is None}
    reasons = [r["reason"] for r in mine if r.get("sample") is None and r.get("reason")]
    if samples:
        if all(r.get("failure") == EMPTY for r in samples):
            return 0.0, "every generation empty"
        return None, None
    if ZERO_NORM in kinds:
        return 0.0, reasons[0] if reasons else "zero-norm direction"
    if UNDESCRIBED in kinds:
        return None, reasons[0] if reasons else "no description"
    if UNREACHABLE in kinds:
        return 0.0, "every KL target unreachable" + (f" ({reasons[0]})" if reasons else "")
    return None, "no steering rows for this feature"


def _select(scores: dict, pick, report) -> tuple[float | None, tuple | None, int, str | None]:
    """The best (target, sign) by mean over the samples `pick` accepts; its mean over
    the samples `report` accepts, and how many defined samples that mean has."""

    def defined(values: dict, keep) -> list[float]:
        return [v for s, v in values.items() if keep(s) and v is not None]

    ranked = [(float(np.mean(d)), key) for key, v in scores.items() if (d := defined(v, pick))]
    if not ranked:
        return None, None, 0, "no (KL target, sign) with a defined score in the choosing half"
    _, key = max(ranked, key=lambda p: (p[0], -p[1][0], p[1][1]))
    reported = defined(scores[key], report)
    if not reported:
        return None, key, 0, "no defined score in the reported half"
    return float(np.mean(reported)), key, len(reported), None


def _summary(per_feature, rows, chosen, heldout_parts, failed, passes, judge_stats, seed,
             n_resamples) -> list[dict]:  # fmt: skip
    def estimate(metric: str, values: list, **extra) -> dict:
        est = mean_estimate(values, paired_over="feature", n_resamples=n_resamples, seed=seed)
        missing = sum(v is None for v in values)
        return {"metric": metric, **est.row(), "missing": missing, **extra}

    out = [
        estimate(m, [r["value"] for r in per_feature if r["metric"] == m])
        for m in (HELDOUT, BEST_KL)
    ]
    for metric in ("concept_score", "fluency_score"):
        values = []
        for f in chosen:
            got = [r["value"] for r in heldout_parts.get(f, []) if r["metric"] == metric]
            got = [v for v in got if v is not None]
            values.append(float(np.mean(got)) if got else None)
        out.append(estimate(metric, values))
    judged = [r for r in rows if r.get("sample") is not None and r.get("failure") != EMPTY
              and r["metric"] in ("concept_score", "fluency_score")]  # fmt: skip
    sampleless = [
        r for r in rows if r.get("sample") is None and r.get("metric") == "steering_score"
    ]
    targets = {
        (r["feature"], r["kl_target"], r["sign"]) for r in rows if r.get("sample") is not None
    }
    unreachable = sum(r.get("failure") == UNREACHABLE for r in sampleless)
    searched = [p for f, p in passes.items() if p]
    out += [
        {"metric": "judge_failures", "value": float(sum(r["value"] is None for r in judged)),
         "n": len(judged),
         "features_undescribed": sum(r.get("failure") == UNDESCRIBED for r in sampleless)},
        {"metric": "failed_features", "value": float(len(failed)), "n": len(chosen),
         "features": ",".join(map(str, failed)),
         "reason": "; ".join(f"feature {f}: {why}" for f, why in failed.items()) or None},
        {"metric": "unreachable_targets", "value": float(unreachable),
         "n": unreachable + len(targets)},
        {"metric": "alpha_search_passes", "value": float(np.mean(searched)) if searched else None,
         "n": len(searched), "reason": None if searched else "no feature searched"},
        {"metric": "steered_features", "value": float(len(chosen)), "n": len(chosen),
         "features_chosen": ",".join(map(str, chosen))},
    ]  # fmt: skip
    return out + [{"metric": f"judge_{k}", "value": float(v)} for k, v in judge_stats.items()]

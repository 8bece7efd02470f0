"""Causal steering: push the model along a feature and judge what it writes.

The SNMF paper's protocol, made explicit:

1. For each chosen feature and each KL target, find alpha (both signs) such
   that adding alpha * unit(direction) at the feature's own hook, at every
   position, moves the next-token distribution after the prompt by
   KL(P_base || P_steered) = target (within `tolerance`). The search
   evaluates many candidate alphas in one batched forward pass per round
   (`search_alpha`), instead of one bisection step per pass.
2. Generate `samples` continuations per (feature, target, sign) with that
   alpha added at every position, prompt and generated tokens alike, batched
   across features, targets, signs and samples with a KV cache. Each sample
   draws its random numbers from its own seed, so the text does not depend
   on the batch it landed in.
3. A judge scores each text for the feature's concept (against a description,
   see `describe_features`) and for fluency, on 0-2 scales; the sample's
   steering score is their harmonic mean (0 when either is 0).

Per feature: `best_steering_score` (best (target, sign) by mean score, the
paper's selection) and `heldout_steering_score` (the (target, sign) chosen on
even samples, reported on odd ones). Summary rows: means over features with
95% bootstrap intervals, `judge_failures`, and the alpha-search cost.

Each finished feature is checkpointed in the job's folder
(`checkpoints/steering/feature_<i>.json`), so a job killed mid-task resumes at
the next feature; run.py removes the checkpoints once `metrics.parquet` exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.checkpoints import Checkpoints
from bench.contexts import encode_all, sentence_max, top_contexts
from bench.errors import ConfigError
from bench.judges.base import Judge, Judgement
from bench.steer import generate, search_alpha
from methods.base import Features
from tasks.base import Task, TaskData
from tasks.concept_detection import auroc_matrix

log = logging.getLogger(__name__)

DESCRIPTIONS = ("input_centric", "output_centric")


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
    batch_size: int = 128  # sequences per generation batch: one feature's 112 rows at once
    baseline_samples: int = 16  # unsteered continuations the concept judge compares against
    description: str = "input_centric"  # input_centric | output_centric
    match_auroc: float = 0.8  # train AUROC at which a feature counts as matched to a concept
    top_tokens: int = 8  # tokens listed in token-based descriptions
    search_points: int = 48  # candidate alphas per search round (one batched pass)
    search_rounds: int = 6  # refinement rounds after the first grid
    bootstrap: int = 1000  # resamples for the 95% intervals

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
            "baseline_samples": (self.baseline_samples >= 1, ">= 1"),
            "description": (self.description in DESCRIPTIONS, f"one of {list(DESCRIPTIONS)}"),
            "search_points": (self.search_points >= 4, ">= 4"),
        }  # fmt: skip
        for key, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"task.steering.{key}={getattr(self, key)!r}: must be {allowed}")

    # --- the task ------------------------------------------------------------

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        judge: Judge | None = getattr(data, "judge", None)
        if judge is None:
            raise ConfigError("task steering needs a judge; judge=none. Use judge=offline.")
        judge.bind(model)
        chosen = select_features(len(features), self.max_features, data.seed)
        unit = features.directions / features.directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        described = describe_features(self, model, features, data, judge, chosen, unit)
        baseline = self._generate(model, features.hook, unit, [], data.seed)[1]
        store = Checkpoints(data.output_dir / "checkpoints" / "steering", data.config_hash)

        rows: list[dict] = []
        passes, failures = [], 0
        resumed_stats: dict[str, float] = {}
        for f in tqdm(chosen, desc="steering", unit="feature", leave=False):
            done = store.load(f, unit[f])
            if done is None:
                before = judge.stats()
                done = self._steer_feature(model, features.hook, unit, f, described[f], baseline,
                                           judge, data.seed)  # fmt: skip
                after = judge.stats()
                done["judge_stats"] = {k: v - before.get(k, 0.0) for k, v in after.items()}
                store.save(f, unit[f], done)
            else:
                for k, v in done["judge_stats"].items():
                    resumed_stats[k] = resumed_stats.get(k, 0.0) + v
            rows += done["rows"]
            passes.append(done["passes"])
            failures += done["failures"]
        stats = judge.stats()
        stats.update({k: stats.get(k, 0.0) + v for k, v in resumed_stats.items()})
        rows += self._feature_rows(rows, chosen, described)
        rows += self._summary_rows(rows, chosen, failures, passes, stats)
        for row in rows:
            row.setdefault("judge", type(judge).name or type(judge).__name__.lower())
            row.setdefault("description", described.get(row.get("feature"), {}).get("kind"))
        return rows

    def _steer_feature(self, model, hook, unit, f, described, baseline, judge, seed) -> dict:
        """Search, generate and judge one feature: its rows, search passes and judge failures."""
        rows: list[dict] = []
        jobs = []  # (feature, target index, sign, alpha, kl)
        found, n_passes = search_alpha(model, hook, unit[f], self)
        for (t, sign), (alpha, kl, reason) in found.items():
            if alpha is None:
                rows.append(_row(f, described, "steering_score", None, self.kl_targets[t], sign,
                                 reason=reason, kl_achieved=kl))  # fmt: skip
            else:
                jobs.append((f, t, sign, alpha, kl))
        texts = self._generate(model, hook, unit, jobs, seed)[0] if jobs else []
        failures = 0
        for sign in (1, -1):
            mine = [(j, job) for j, job in enumerate(jobs) if job[2] == sign]
            if not mine:
                continue
            text_list = [s for j, _ in mine for s in texts[j]]
            prompts = [p for _ in mine for p in self._sample_prompts()]
            concept = judge.concept(text_list, described["text"][sign], baseline)
            fluency = _fluency(judge, text_list, prompts)
            failures += sum(j.score is None for j in concept + fluency)
            for n, ((_, (_, t, _, alpha, kl)), sample) in enumerate(
                (m, s) for m in mine for s in range(self.samples)
            ):
                rows += _sample_rows(
                    f, described, sign, self.kl_targets[t], float(alpha), float(kl), sample,
                    prompts[n], text_list[n], concept[n], fluency[n],
                )  # fmt: skip
        return {"rows": rows, "passes": n_passes, "failures": failures}

    def _sample_prompts(self) -> list[str]:
        return [self.prompts[s % len(self.prompts)] for s in range(self.samples)]

    def _generate(self, model, hook, unit, jobs, seed) -> tuple[list[list[str]], list[str]]:
        """Texts of every job's samples, and the unsteered baseline texts (those only
        when `jobs` is empty)."""
        specs = []  # (prompt, steering vector, seed key)
        if not jobs:
            zero = torch.zeros(unit.shape[1])
            for s in range(self.baseline_samples):
                specs.append((self.prompts[s % len(self.prompts)], zero, (seed, 0, 0, 0, s)))
            return [], generate(model, hook, specs, self)
        for f, t, sign, alpha, _ in jobs:
            for s, prompt in enumerate(self._sample_prompts()):
                specs.append((prompt, alpha * unit[f], (seed, f + 1, t, sign + 1, s)))
        out = generate(model, hook, specs, self)
        return [out[i * self.samples : (i + 1) * self.samples] for i in range(len(jobs))], []

    def _feature_rows(self, rows: list[dict], chosen: list[int], described: dict) -> list[dict]:
        out = []
        for f in chosen:
            scores: dict[tuple[float, int], dict[int, float]] = {}
            for r in rows:
                if (
                    r["feature"] == f
                    and r["metric"] == "steering_score"
                    and r.get("sample") is not None
                ):
                    key = (r["kl_target"], r["sign"])
                    scores.setdefault(key, {})[r["sample"]] = r["value"]
            best = _select(scores, lambda s: True, lambda s: True)
            held = _select(scores, lambda s: s % 2 == 0, lambda s: s % 2 == 1)
            for metric, (value, key, reason) in (("best_steering_score", best),
                                                 ("heldout_steering_score", held)):  # fmt: skip
                out.append(_row(f, described[f], metric, value, key[0] if key else None,
                                key[1] if key else None, reason=reason))  # fmt: skip
        return out

    def _summary_rows(self, rows, chosen, failures, passes, stats: dict) -> list[dict]:
        out = []
        rng = np.random.default_rng(0)
        for feature_metric, metric in (("best_steering_score", "steering_score"),
                                       ("heldout_steering_score", "heldout_steering_score")):  # fmt: skip
            values = [
                r["value"] for r in rows if r["metric"] == feature_metric and r["value"] is not None
            ]
            mean, low, high = bootstrap_mean(values, self.bootstrap, rng)
            out.append({"metric": metric, "value": mean, "ci_low": low, "ci_high": high,
                        "n_features": len(values),
                        "reason": None if values else "no feature has a defined score"})  # fmt: skip
        for metric in ("concept_score", "fluency_score"):
            values = [r["value"] for r in rows if r["metric"] == metric and r["value"] is not None]
            out.append({"metric": metric, "value": float(np.mean(values)) if values else None,
                        "reason": None if values else "no defined judgement"})  # fmt: skip
        n_judged = sum(r["metric"] in ("concept_score", "fluency_score") for r in rows)
        unreachable = sum(r["metric"] == "steering_score" and r.get("sample") is None for r in rows)
        out += [
            {"metric": "judge_failures", "value": float(failures), "n_judgements": n_judged},
            {"metric": "unreachable_targets", "value": float(unreachable)},
            {
                "metric": "alpha_search_passes",
                "value": float(np.mean(passes)) if passes else None,
                "reason": None if passes else "no feature searched",
            },  # fmt: skip
            {
                "metric": "steered_features",
                "value": float(len(chosen)),
                "features_chosen": ",".join(map(str, chosen)),
            },  # fmt: skip
        ]
        out += [{"metric": f"judge_{k}", "value": float(v)} for k, v in stats.items()]
        return out


# --- which features, and what the judge checks them against ---------------------


def select_features(n_features: int, max_features: int, seed: int) -> list[int]:
    """A seeded uniform sample of feature indices (all when there are few), sorted."""
    if n_features <= max_features:
        return list(range(n_features))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_features, size=max_features, replace=False).tolist())


def describe_features(
    task: Steering, model, features: Features, data: TaskData, judge: Judge, chosen, unit
) -> dict[int, dict]:
    """Per chosen feature: {"kind", "concept", "text": {sign: description}}."""
    if task.description == "output_centric":
        out = {}
        for f in chosen:
            up, down = vocab_projection(model, features.hook, unit[f], task.top_tokens)
            out[f] = {"kind": "output_centric", "concept": None,
                      "text": {1: _token_list(up), -1: _token_list(down)}}  # fmt: skip
        return out

    dataset, acts = data.dataset, data.activations
    train = dataset.indices("train")
    train_acts = acts.subset(train)
    codes = encode_all(features, train_acts)
    concepts = dataset.concepts
    matched: dict[int, str] = {}
    if features.labels is not None:
        matched = {f: features.labels[f] for f in chosen if features.labels[f]}
    elif len(concepts) >= 2:
        remap = {int(s): i for i, s in enumerate(train)}
        local = torch.tensor([remap[int(s)] for s in train_acts.sentence_ids])
        scores = sentence_max(codes, local, len(train)).numpy()
        labels = np.array(dataset.labels)[train]
        auc = auroc_matrix(scores, labels[:, None] == np.array(concepts)[None, :])
        for f in chosen:
            c = int(np.nan_to_num(auc[:, f], nan=0.5).argmax())
            if auc[c, f] >= task.match_auroc:
                matched[f] = concepts[c]
    contexts = top_contexts(features, train_acts, model.tokenizer, codes=codes[:, chosen])
    out = {}
    for f, ctx in zip(chosen, contexts, strict=True):
        if f in matched:
            text, kind = matched[f].replace("_", " "), "input_centric:label"
        else:
            text = judge.describe([c["context"] for c in ctx]) if judge.can_write else None
            kind = "input_centric:summary"
            if text is None:
                text, kind = _token_list([c["token"] for c in ctx]), "input_centric:tokens"
        out[f] = {"kind": kind, "concept": matched.get(f), "text": {1: text, -1: text}}
    return out


def vocab_projection(model, hook: str, direction: torch.Tensor, top: int) -> tuple[list, list]:
    """Top promoted tokens of a direction, for each sign: through W_out for an MLP
    hidden direction, then the final norm's scale and the unembedding."""
    layer = int(hook.split(".")[1])
    v = direction.to(model.W_U.device, model.W_U.dtype)
    if hook.endswith("mlp.hook_post"):
        v = v @ model.blocks[layer].mlp.W_out
    w = getattr(model.ln_final, "w", None)
    logits = (v * w if w is not None else v) @ model.W_U
    decode = model.tokenizer.decode
    return ([decode([i]) for i in logits.topk(top).indices.tolist()],
            [decode([i]) for i in (-logits).topk(top).indices.tolist()])  # fmt: skip


def _token_list(tokens: list[str]) -> str:
    seen = list(dict.fromkeys(t.strip() for t in tokens if t.strip()))
    return ", ".join(seen) if seen else "(no tokens)"


# --- judging and rows ---------------------------------------------------------------


def _fluency(judge: Judge, texts: list[str], prompts: list[str]) -> list[Judgement]:
    out: list[Judgement | None] = [None] * len(texts)
    for prompt in dict.fromkeys(prompts):
        where = [i for i, p in enumerate(prompts) if p == prompt]
        for i, j in zip(where, judge.fluency([texts[i] for i in where], prompt), strict=True):
            out[i] = j
    return out  # type: ignore[return-value]


def steering_score(concept: float | None, fluency: float | None) -> float | None:
    """Harmonic mean of the two 0-2 scores; 0 when either is 0, missing when either is."""
    if concept is None or fluency is None:
        return None
    if concept == 0 or fluency == 0:
        return 0.0
    return 2 * concept * fluency / (concept + fluency)


def _row(f, described, metric, value, kl_target, sign, **extra) -> dict:
    return {"feature": f, "concept": described.get("concept"), "metric": metric, "value": value,
            "kl_target": kl_target, "sign": sign, **extra}  # fmt: skip


def _sample_rows(f, described, sign, target, alpha, kl, sample, prompt, text, concept, fluency):
    common = {"alpha": alpha, "kl_achieved": kl, "sample": sample, "prompt": prompt, "text": text,
              "description_text": described["text"][sign]}  # fmt: skip
    score = steering_score(concept.score, fluency.score)
    reasons = "; ".join(r for r in (concept.reason, fluency.reason) if r) or None
    return [
        _row(
            f,
            described,
            "concept_score",
            concept.score,
            target,
            sign,
            reason=concept.reason,
            **common,
        ),
        _row(
            f,
            described,
            "fluency_score",
            fluency.score,
            target,
            sign,
            reason=fluency.reason,
            **common,
        ),
        _row(f, described, "steering_score", score, target, sign, reason=reasons, **common),
    ]


def _select(scores: dict, pick: Any, report: Any) -> tuple[float | None, tuple | None, str | None]:
    """Best (target, sign) by mean score over the samples `pick` accepts, and its
    mean over the samples `report` accepts."""

    def mean(values: dict[int, float], keep) -> float | None:
        kept = [v for s, v in values.items() if keep(s) and v is not None]
        return float(np.mean(kept)) if kept else None

    ranked = [(mean(v, pick), key) for key, v in scores.items()]
    ranked = [(m, key) for m, key in ranked if m is not None]
    if not ranked:
        return None, None, "no (KL target, sign) with a defined score"
    _, key = max(ranked, key=lambda p: (p[0], -p[1][0]))  # ties: the smaller KL
    value = mean(scores[key], report)
    return value, key, None if value is not None else "no defined score in the reported half"


def bootstrap_mean(values: list[float], n: int, rng: np.random.Generator):
    """Mean and 95% percentile-bootstrap interval over `values` (None when empty)."""
    if not values:
        return None, None, None
    arr = np.asarray(values, dtype=float)
    if len(arr) == 1:
        return float(arr[0]), float(arr[0]), float(arr[0])
    means = arr[rng.integers(0, len(arr), size=(n, len(arr)))].mean(1)
    return float(arr.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))

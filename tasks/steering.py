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
from bench.descriptions import INPUT_CENTRIC, KINDS, Describer, Description, check_kind, label
from bench.errors import ConfigError
from bench.judges.base import Judge, Judgement
from bench.stats import RESAMPLES, units_hash
from bench.steer import ENGINES, generate, search_alpha
from bench.steering_scores import (
    EMPTY,
    UNDESCRIBED,
    UNREACHABLE,
    ZERO_NORM,
    _row,
    aggregate,
)
from methods.base import Features
from tasks.base import Headline, Task, TaskData
from tasks.concept_detection import auroc_matrix, sentence_scores

log = logging.getLogger(__name__)

PROTOCOLS = ("concept", "feature")

#: bumped when a checkpoint's content changes meaning, so old checkpoints are not reused
CHECKPOINT_VERSION = "steering-2"
EMPTY_REASON = "empty generation"


@dataclass
class Steering(Task):
    name: ClassVar[str] = "steering"
    needs_judge: ClassVar[bool] = True
    title: ClassVar[str] = "Steering"
    headlines: ClassVar[tuple[Headline, ...]] = (
        Headline("heldout_steering_score"),  # chosen on one half, reported on the other
        Headline("best_kl_steering_score"),  # the paper's best over KL targets: optimistic
        Headline("concept_score"),
        Headline("fluency_score"),
    )
    report_order: ClassVar[int] = 0  # the causal test leads the comparison

    prompts: list[str] = field(default_factory=lambda: ["I think that"])  # the paper's prompt
    kl_targets: list[float] = field(  # the paper's KL grid
        default_factory=lambda: [0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5]
    )
    tolerance: float = 0.01  # |KL - target| accepted by the alpha search
    # concept: for each concept, every method's feature with the best train-split AUROC for it
    # (DiffMean: its own direction), judged against the concept's label, so methods pair over
    # concepts; feature: sampled features with their own descriptions (the SNMF paper's).
    protocol: str = "concept"
    concepts: int | None = 8  # concept protocol: a seeded sample of concepts (null = all of them)
    concept_seed: int = 0  # fixed, not the run's seed: every method and seed steers the same ones
    max_features: int = 3  # feature protocol: features drawn with the run's seed
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
            "protocol": (self.protocol in PROTOCOLS, f"one of {list(PROTOCOLS)}"),
            "concepts": (self.concepts is None or self.concepts >= 1, ">= 1 or null (all)"),
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

    @property
    def min_concepts(self) -> int:  # type: ignore[override]
        """The concept protocol matches features to concepts: it needs two at least."""
        return 2 if self.protocol == "concept" else 0

    def check_judge(self, judge: Judge | None) -> None:
        """Refuse a judge these settings cannot use (call before the model loads)."""
        if judge is None:
            raise ConfigError("task steering needs a judge; judge=none. Use judge=offline.")
        if self.protocol == "feature":  # the concept protocol judges against labels
            check_kind(self.description, judge)

    # --- the protocol ----------------------------------------------------------

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        judge: Judge | None = data.judge
        self.check_judge(judge)
        judge.bind(model)
        norms = features.directions.norm(dim=1)
        unit = features.directions / norms[:, None].clamp_min(1e-12)
        # select: the units steered, each with its feature (and, for concepts, its label)
        if self.protocol == "concept":
            units, feature_of, described, extra = self._concept_units(features, data)
            kind, pairing = "label", units_hash(data.dataset.content_hash, units)
        else:
            units = select_features(len(features), self.max_features, data.seed)
            feature_of, described, extra = {f: f for f in units}, None, {}
            kind, pairing = self.description, None
        # A unit's key names its checkpoint and seeds its samples: the feature index under
        # the feature protocol, the concept's position under the concept protocol.
        keys = units if self.protocol == "feature" else list(range(len(units)))
        store = Checkpoints(data.output_dir / "checkpoints" / "steering", data.config_hash,
                            version=CHECKPOINT_VERSION)  # fmt: skip
        done = {i: store.load(keys[i], unit[feature_of[u]]) for i, u in enumerate(units)}
        todo = [feature_of[u] for i, u in enumerate(units) if done[i] is None]
        if described is None:  # describe (the feature protocol; concepts have their label)
            split = data.dataset.indices("train")
            train = data.activations.subset(split)
            encodings = data.encodings(features)  # the job's codes: nothing encoded twice
            wanted = todo and self.description in INPUT_CENTRIC  # token-based kinds read codes
            codes = encodings.tokens()[encodings.rows(split)] if wanted else None
            described = Describer(self.description, model, features, train, judge, todo, unit,
                                  self.top_tokens, codes=codes)  # fmt: skip
        baseline = self._baseline(model, features.hook, unit.shape[1], data.seed) if todo else []
        resumed: dict[str, float] = {}
        for i, u in enumerate(tqdm(units, desc="steering", unit=self.protocol, leave=False)):
            if done[i] is not None:
                for k, v in done[i]["judge_stats"].items():
                    resumed[k] = resumed.get(k, 0.0) + v
                continue
            f = feature_of[u]
            before = judge.stats()
            # calibrate -> generate -> judge, for one unit
            result = self._steer_feature(model, features.hook, f, unit[f], float(norms[f]),
                                         described(u), baseline, judge, data.seed, keys[i])  # fmt: skip
            result["judge_stats"] = {k: v - before.get(k, 0.0) for k, v in judge.stats().items()}
            store.save(keys[i], unit[f], result)
            done[i] = result
        stats = judge.stats()
        stats.update({k: stats.get(k, 0.0) + v for k, v in resumed.items()})
        rows = [{**row, **extra.get(u, {})} for i, u in enumerate(units) for row in done[i]["rows"]]
        # aggregate: per unit, then the summary with intervals over units
        passes = {u: done[i]["passes"] for i, u in enumerate(units)}
        rows += aggregate(rows, units, passes=passes, judge_stats=stats, seed=data.seed,
                          n_resamples=self.bootstrap, unit=self.protocol, units_hash=pairing)  # fmt: skip
        for row in rows:
            row.setdefault("judge", type(judge).name or type(judge).__name__.lower())
            row.setdefault("description", kind)
            row.setdefault("protocol", self.protocol)
        return rows

    def _concept_units(self, features: Features, data: TaskData) -> tuple:
        """The concept protocol's units: a seeded sample of the dataset's concepts, each
        with the method's feature for it (its own label's direction for a supervised
        method, else the best train-split AUROC of its native encoding, as concept
        detection matches) and the concept's label as the description."""
        concepts = data.dataset.concepts
        if self.concepts is not None and self.concepts < len(concepts):
            rng = np.random.default_rng(self.concept_seed)
            picked = sorted(rng.choice(concepts, size=self.concepts, replace=False).tolist())
        else:
            picked = list(concepts)
        train = data.dataset.indices("train")
        labels = np.array(data.dataset.labels)[train]
        scores = sentence_scores(features, data, "native")[train]
        auc = np.nan_to_num(auroc_matrix(scores, labels[:, None] == np.array(concepts)[None, :]),
                            nan=0.5)  # C x k  # fmt: skip
        feature_of, extra = {}, {}
        for c in picked:
            row = auc[concepts.index(c)]
            own = features.labels.index(c) if features.labels and c in features.labels else None
            f = own if own is not None else int(row.argmax())
            feature_of[c] = f
            extra[c] = {"match_auroc": float(row[f]), "supervised": features.labels is not None}
        return picked, feature_of, label, extra

    def _steer_feature(self, model, hook, f, direction, norm, desc: Description, baseline,
                       judge, seed, key: int | None = None) -> dict:  # fmt: skip
        """Calibrate, generate and judge one unit (feature f, described by `desc`): its rows
        and search passes. `key` seeds its samples (default: the feature index)."""
        key = f if key is None else key
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
        specs = [(prompt, alpha * direction, (seed, key + 1, t, sign + 1, s))
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


def _failure(f, desc: Description, failure, reason, kl_target=None, sign=None, **extra) -> dict:
    """A sample-less `steering_score` row saying why nothing was generated or judged."""
    return _row(f, desc.concept, "steering_score", None, kl_target, sign, sample=None,
                failure=failure, reason=reason, **extra)  # fmt: skip

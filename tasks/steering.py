"""Causal steering: push the model along a feature and judge what it writes.

The protocol, in the order `evaluate` runs it:

1. **Select**: the units steered. `concept`: a seeded sample of concepts, each with
   every method's best-matching feature; `feature` / `paper`: features drawn with the
   run's seed, `max_features` of them (null: every feature, as the paper).
2. **Describe**: one kind of description for every feature (`description`, see
   `bench/descriptions.py`); `description_signs` says which signs an input-centric
   one is judged on. What is steered is the feature's direction, or
   (`direction=generated_diffmean`) the paper's DiffMean of sentences written from
   that description (`bench/generated_sentences.py`).
3. **Calibrate**: for each KL target and sign, alpha such that adding alpha * unit
   vector at the hook, at every position, moves the next-token distribution after the
   prompt by KL(P_base || P_steered) = target (`bench/alpha_search.py`: `batched` or
   the reference's `bisection`; the -1 sign `calibrated` or `mirrored`).
4. **Generate**: `samples` continuations per (unit, target, sign), batched with a KV
   cache, each from its own seed (`bench/steer.py`, sampler in `bench/sampling.py`).
5. **Judge**: concept (against that sign's description) and fluency, 0-2; the
   sample's `steering_score` is their harmonic mean. A failed judgement is missing
   (`judge_failure=missing`) or 0 (`zero`, the paper's), counted either way.
6. **Aggregate** (`bench/steering_scores.py`, on plain rows): per unit the headline
   `heldout_steering_score` (target and sign chosen on even samples, reported on
   odd ones) and the paper's `best_kl_steering_score`; summaries with 95% intervals.

`protocol` is a preset: every field left at null (`protocol` for `top_p` and
`max_features`, whose null means something) takes the protocol's value from
`PROTOCOL_VALUES`; a value set explicitly wins, so one deviation from the paper can
be removed at a time. docs/paper-protocol.md lists every difference.

Each finished unit is checkpointed in the job's folder, so a killed job resumes at
the next unit; run.py removes the checkpoints once `metrics.parquet` exists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.alpha_search import calibrate
from bench.checkpoints import Checkpoints
from bench.descriptions import INPUT_CENTRIC, Describer, Description, check_kind, label
from bench.detection_stats import auroc_matrix, best_feature_per_concept
from bench.errors import ConfigError
from bench.generated_sentences import diffmean_vector, write_sentences
from bench.judges.base import Judge, Judgement
from bench.stats import RESAMPLES, units_hash
from bench.steer import generate, post_norm_targets
from bench.steering_scores import (
    EMPTY,
    EXCLUDED,
    NO_DIRECTION,
    UNDESCRIBED,
    UNREACHABLE,
    ZERO_NORM,
    _row,
    aggregate,
)
from bench.steering_settings import PROTOCOL, PROTOCOL_VALUES, check, resolve
from featbench.methods.base import Features
from featbench.tasks.base import Headline, Task, TaskData
from featbench.tasks.concept_detection import select_features, sentence_scores

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = "steering-3"  # bumped when a checkpoint's content changes meaning
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
    stop_at_eos: bool | None = None  # null: the protocol's
    batch_size: int = 128  # sequences per generation batch: one feature's rows at once
    engine: str = "lean"  # bench.decode: same weights and hook, faster; reference: TL forward
    baseline_samples: int = 16  # unsteered continuations the concept judge compares against
    description: str | None = None  # one kind for every method (null: the protocol's)
    description_signs: str | None = None  # described | both (null: the protocol's)
    top_tokens: int | None = None  # tokens listed / read by the writer (null: the kind's)
    alpha_search: str | None = None  # batched | bisection (null: the protocol's)
    negative_alpha: str | None = None  # calibrated | mirrored (null: the protocol's)
    # bisection's [low, high] of alpha, the paper's
    alpha_range: list[float] = field(default_factory=lambda: [1.0, 2000.0])
    bisection_steps: int = 20  # the paper's: all 20 run, the last in-tolerance midpoint kept
    search_points: int = 48  # batched: candidate alphas per search round (one batched pass)
    search_rounds: int = 6  # batched: refinement rounds after the first grid
    judged_text: str | None = None  # continuation | bos_prompt_continuation (null: the protocol's)
    judge_failure: str | None = None  # missing | zero (null: the protocol's)
    judge_attempts: int | None = None  # tries per rating (null: the protocol's)
    rating_format: str | None = None  # strict | reference: how ratings are read (null: protocol's)
    post_norm_mlp_out: bool | None = None  # Gemma: steer mlp_post features at hook_mlp_out
    diffmean_bos: bool | None = None  # generated DiffMean: include the BOS row (null: protocol's)
    bootstrap: int = RESAMPLES  # resamples for the 95% intervals

    def __post_init__(self) -> None:
        resolve(self)  # every setting left to the protocol takes the protocol's value
        check(self)
        log.info("steering protocol %s: %s", self.protocol, json.dumps(self.resolved()))

    def resolved(self) -> dict[str, Any]:
        """The protocol-dependent settings as resolved (for the log and the rows)."""
        return {key: getattr(self, key) for key in (*PROTOCOL_VALUES, "direction", "top_tokens")}

    @property
    def min_concepts(self) -> int:  # type: ignore[override]
        """The concept protocol matches features to concepts: it needs two at least."""
        return 2 if self.protocol == "concept" else 0

    def check_judge(self, judge: Judge | None) -> None:
        """Refuse a judge these settings cannot use (call before the model loads)."""
        if judge is None:
            raise ConfigError("task steering needs a judge; judge=none. Use judge=offline.")
        if self.protocol != "concept":  # the concept protocol judges against labels
            check_kind(self.description, judge)
        if self.direction == "generated_diffmean" and not judge.can_write:
            raise ConfigError(
                f"task.steering.direction=generated_diffmean needs a judge that writes sentences "
                f"(judge=openai or hf_chat); judge {judge.label()} cannot"
            )

    # --- the protocol ----------------------------------------------------------

    def evaluate(self, model: Any, features: Features, data: TaskData, cfg: Any) -> list[dict]:
        self.check_judge(data.judge)
        judge = data.judge.with_policy(self.judge_attempts, self.rating_format)
        judge.bind(model)
        start = judge.stats()  # this task's judge counters are the change from here
        norms = features.directions.norm(dim=1)
        unit = features.directions / norms[:, None].clamp_min(1e-12)
        # select: the units steered, each with its feature (and, for concepts, its label)
        if self.protocol == "concept":
            units, feature_of, describe, extra = self._concept_units(features, data)
            kind, pairing = "label", units_hash(data.dataset.content_hash, units)
        else:
            units = select_features(len(features), self.max_features, data.seed)
            feature_of, describe, extra = {f: f for f in units}, None, {}
            kind, pairing = self.description, None
        # A unit's key names its checkpoint and seeds its samples: the feature index under
        # the feature protocols, the concept's position under the concept protocol.
        keys = units if self.protocol != "concept" else list(range(len(units)))
        store = Checkpoints(data.output_dir / "checkpoints" / f"steering-{self.protocol}",
                            data.config_hash, version=CHECKPOINT_VERSION)  # fmt: skip
        done = {i: store.load(keys[i], unit[feature_of[u]]) for i, u in enumerate(units)}
        todo = [feature_of[u] for i, u in enumerate(units) if done[i] is None]
        steered = post_norm_targets(model, features, unit, todo) if self.post_norm_mlp_out else {}
        if describe is None:  # describe (the feature protocols; concepts have their label)
            split = data.dataset.indices("train")
            encodings = data.encodings(features)  # the job's codes: nothing encoded twice
            wanted = todo and self.description in INPUT_CENTRIC  # kinds that read train codes
            codes = encodings.tokens()[encodings.rows(split)] if wanted else None
            describe = Describer(self.description, model, features, data.activations.subset(split),
                                 judge, todo, unit, self.top_tokens, codes=codes, steered=steered)  # fmt: skip
        baseline = self._baseline(model, features.hook, unit.shape[1], data.seed) if todo else []
        resumed: dict[str, float] = {}
        for i, u in enumerate(tqdm(units, desc="steering", unit=self.protocol, leave=False)):
            if done[i] is not None:
                for k, v in done[i]["judge_stats"].items():
                    resumed[k] = resumed.get(k, 0.0) + v
                continue
            f = feature_of[u]
            before = judge.stats()
            desc = describe(u).for_signs(self.description_signs)
            # what is steered: the feature's direction, or the DiffMean of generated sentences
            hook, vector, norm = features.hook, unit[f], float(norms[f])
            info: dict = {}
            if f in steered:
                vector, hook = steered[f]
            if self.direction == "generated_diffmean" and desc.texts:  # (none: undescribed)
                hook, vector, norm, why, info = self._generated_diffmean(model, hook, desc, judge)
            if vector is None:
                result = {"rows": [_failure(f, desc, NO_DIRECTION, why)], "passes": 0}
            else:  # calibrate -> generate -> judge, for one unit
                result = self._steer_feature(model, hook, f, vector, norm, desc, baseline, judge,
                                             data.seed, keys[i])  # fmt: skip
            result["rows"] = [{**row, **info} for row in result["rows"]]  # sentences written
            done[i] = self._save(store, keys[i], unit[f], result, judge, before)
        stats = {k: v - start.get(k, 0.0) for k, v in judge.stats().items()}
        stats.update({k: stats.get(k, 0.0) + v for k, v in resumed.items()})
        rows = [{**row, **extra.get(u, {})} for i, u in enumerate(units) for row in done[i]["rows"]]
        # aggregate: per unit, then the summary with intervals over units
        passes = {u: done[i]["passes"] for i, u in enumerate(units)}
        per = "concept" if self.protocol == "concept" else "feature"
        rows += aggregate(rows, units, passes=passes, judge_stats=stats, seed=data.seed,
                          n_resamples=self.bootstrap, unit=per, units_hash=pairing,
                          settings=json.dumps(self.resolved()))  # fmt: skip
        for row in rows:
            row.setdefault("judge", type(judge).name or type(judge).__name__.lower())
            row.setdefault("judge_label", judge.label())
            row.setdefault("judge_failure_policy", self.judge_failure)
            row.setdefault("description", kind)
            row.setdefault("protocol", self.protocol)
            row.setdefault("direction", self.direction)
        return rows

    def _save(self, store, key, direction, result, judge, before) -> dict:
        result["judge_stats"] = {k: v - before.get(k, 0.0) for k, v in judge.stats().items()}
        store.save(key, direction, result)
        return result

    def _generated_diffmean(self, model, hook: str, desc: Description, judge) -> tuple:
        """(hook, unit vector or None, its norm, why None, row info): the paper's DiffMean of
        sentences written from the feature's description, at the layer's hook_mlp_out."""
        hook = f"blocks.{hook.split('.')[1]}.hook_mlp_out"
        sentences = write_sentences(judge, desc.texts[1])
        info = {"n_activating": len(sentences.activating), "n_neutral": len(sentences.neutral)}
        vector, why = diffmean_vector(model, sentences, hook, self.diffmean_bos)
        return hook, vector, 1.0, why, info

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
        sentences = np.array(data.dataset.sentences, dtype=object)[train]
        examples = {c: tuple(sentences[labels == c]) for c in picked}  # what the judge reads
        best = best_feature_per_concept(auc, concepts, features.labels)  # as concept detection
        for c in picked:
            f = int(best[concepts.index(c)])
            feature_of[c] = f
            extra[c] = {"match_auroc": float(auc[concepts.index(c), f])}
        return picked, feature_of, lambda c: label(c, examples[c]), extra

    def _steer_feature(self, model, hook, f, direction, norm, desc: Description, baseline,
                       judge, seed, key: int | None = None) -> dict:  # fmt: skip
        """Calibrate, generate and judge one unit (feature f, described by `desc`): its rows
        and search passes. `key` seeds its samples (default: the feature index)."""
        key = f if key is None else key
        if not norm > 1e-12:  # NaN too
            why = "zero-norm direction" if np.isfinite(norm) else "non-finite direction"
            return {"rows": [_failure(f, desc, ZERO_NORM, why)], "passes": 0}
        rows = [_failure(f, desc, EXCLUDED, why, sign=s) for s, why in desc.excluded.items()]
        if not desc.texts:
            return {"rows": rows or [_failure(f, desc, UNDESCRIBED, desc.reason)], "passes": 0}
        found, passes = calibrate(model, hook, direction, self, signs=desc.signs)
        jobs = []  # (target index, sign, alpha, kl)
        for (t, sign), (alpha, kl, reason) in sorted(found.items()):
            if alpha is None:
                rows.append(_failure(f, desc, UNREACHABLE, reason, self.kl_targets[t], sign,
                                     kl_achieved=kl))  # fmt: skip
            else:
                jobs.append((t, sign, float(alpha), kl))
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
        """Rows of one sign's samples, each judged against that sign's description; an
        empty text scores 0 unjudged (the steering broke the model, not the judge); a
        failed judgement is missing or 0 by `judge_failure`, and marked `judge_failed`."""
        description = desc.texts[sign]
        prompts = [self.prompts[s % len(self.prompts)] for _, s, _ in samples]
        asked = [i for i, (_, _, text) in enumerate(samples) if text.strip()]
        empty = Judgement(0.0, EMPTY_REASON)
        concept, fluency = [empty] * len(samples), [empty] * len(samples)
        if asked:
            texts = [samples[i][2] for i in asked]
            judged_c = judge.concept(texts, description, baseline, kind=desc.kind,
                                     examples=desc.examples or None)  # fmt: skip
            # a text that holds its prompt is rated alone (the reference's fluency rubric)
            holds = self.judged_text == "bos_prompt_continuation"
            judged_f = _fluency(judge, texts, ["" if holds else prompts[i] for i in asked])
            for i, c, fl in zip(asked, judged_c, judged_f, strict=True):
                concept[i], fluency[i] = c, fl
        rows = []
        mirrored = self.negative_alpha == "mirrored" and sign == -1
        for i, ((t, _, alpha, kl), s, text) in enumerate(samples):
            common = {"alpha": alpha, "kl_achieved": kl, "sample": s, "prompt": prompts[i],
                      "text": text, "description_text": description, "alpha_calibrated": not mirrored,
                      "failure": None if text.strip() else EMPTY}  # fmt: skip
            failed_c, failed_f = concept[i].score is None, fluency[i].score is None
            c, fl = self._policy(concept[i]), self._policy(fluency[i])
            score = steering_score(c.score, fl.score)
            reasons = "; ".join(dict.fromkeys(r for r in (c.reason, fl.reason) if r))
            for metric, value, reason, failed in (
                ("concept_score", c.score, c.reason, failed_c),
                ("fluency_score", fl.score, fl.reason, failed_f),
                ("steering_score", score, reasons or None, failed_c or failed_f),
            ):
                rows.append(_row(f, desc.concept, metric, value, self.kl_targets[t], sign,
                                 reason=reason, judge_failed=failed, **common))  # fmt: skip
        return rows

    def _policy(self, judgement: Judgement) -> Judgement:
        """A failed judgement under `judge_failure=zero` scores 0, its reason kept."""
        if judgement.score is None and self.judge_failure == "zero":
            return Judgement(0.0, f"{judgement.reason} (scored 0: judge_failure=zero)")
        return judgement

    def _sample_prompts(self) -> list[str]:
        return [self.prompts[s % len(self.prompts)] for s in range(self.samples)]

    def _baseline(self, model, hook: str, d: int, seed: int) -> list[str]:
        """Unsteered continuations, which the offline concept judge compares against."""
        zero = torch.zeros(d)
        specs = [(self.prompts[s % len(self.prompts)], zero, (seed, 0, 0, 0, s))
                 for s in range(self.baseline_samples)]  # fmt: skip
        return generate(model, hook, specs, self)


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

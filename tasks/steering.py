"""Causal steering: push the model along a feature and judge what it writes.

The protocol, in the order `evaluate` runs it. Each stage runs over all of the job's
units before the next starts, so generation and judging work in full batches:

1. **Select**: the units steered. `concept`: a seeded sample of concepts, each with
   every method's best-matching feature; `feature` / `paper`: features drawn with the
   run's seed, `max_features` of them (null: every feature, as the paper).
2. **Describe**: one kind of description for every feature (`description`, see
   `bench/tasks/descriptions.py`); `description_signs` says which signs an input-centric
   one is judged on. What is steered is the feature's direction, or
   (`direction=generated_diffmean`) the paper's DiffMean of sentences written from
   that description (`bench/tasks/sentences.py`).
3. **Calibrate**: for each unit, KL target and sign, alpha such that adding alpha *
   unit vector at the hook, at every position, moves the next-token distribution after
   the prompt by KL(P_base || P_steered) = target (`bench/tasks/steering/calibrate.py`: `batched`
   or the reference's `bisection`; the -1 sign `calibrated` or `mirrored`).
4. **Generate**: `samples` continuations per (unit, target, sign), and the unsteered
   baseline, in batches of `batch_size` rows whatever unit each row belongs to, with a
   KV cache (`bench/tasks/steering/generate.py`, sampler in `bench/tasks/steering/sampling.py`). Each row draws from its
   own seed key, so its text does not depend on the rows beside it.
5. **Judge**: concept (against that sign's description) and fluency, 0-2; the
   sample's `steering_score` is their harmonic mean (`bench/tasks/steering/units.py`). A
   failed judgement is missing (`judge_failure=missing`) or 0 (`zero`, the paper's),
   counted either way.
6. **Aggregate** (`bench/tasks/steering/scores.py`, on plain rows): per unit the headline
   `heldout_steering_score` (target and sign chosen on even samples, reported on
   odd ones) and the paper's `best_kl_steering_score`; summaries with 95% intervals.

`protocol` is a preset: every field left at `protocol` takes the protocol's value from
`PROTOCOL_VALUES` (bench/tasks/steering/settings.py, where every setting is declared);
a value set explicitly wins, so one deviation from the paper can be removed at a time.
docs/paper-protocol.md lists every difference.

A unit is checkpointed in the job's folder when its texts are generated and again when
they are judged, so a killed job resumes with what it finished; the job removes the
checkpoints once `metrics.parquet` exists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.core.hooks import hook_name, layer_of
from bench.core.storage import sha256_json
from bench.errors import ConfigError
from bench.fit.features import Features
from bench.judges.base import Judge
from bench.stats import units_hash
from bench.tasks.base import Headline, Task, TaskData
from bench.tasks.checkpoints import Checkpoints
from bench.tasks.descriptions import INPUT_CENTRIC, Describer, Description, check_kind, label
from bench.tasks.detection import concept_units, select_features
from bench.tasks.sentences import generated_diffmean
from bench.tasks.steering.calibrate import calibrate
from bench.tasks.steering.generate import Row, generate, generate_batches, post_norm_targets
from bench.tasks.steering.scores import (
    EXCLUDED,
    NO_DIRECTION,
    UNDESCRIBED,
    UNREACHABLE,
    ZERO_NORM,
    aggregate,
)
from bench.tasks.steering.settings import SteeringSettings
from bench.tasks.steering.units import (
    GENERATED,
    JUDGED,
    Unit,
    failure_row,
    judge_samples,
    judge_units,
)

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = "steering-4"  # bumped when a checkpoint's content changes meaning


@dataclass
class Steering(SteeringSettings, Task):
    """The steering task: its settings are `SteeringSettings`
    (bench/tasks/steering/settings.py, the one place they are declared)."""

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
        """The protocol in stages over all of the job's units: select, describe, calibrate
        every unit, generate every row in full batches whatever unit it belongs to, judge
        in batches, aggregate. Each row's own seed key keeps its text independent of the
        batch it lands in."""
        self.check_judge(data.judge)
        judge = data.judge.with_policy(self.judge_attempts, self.rating_format)
        judge.bind(model)
        start = judge.stats()  # this task's judge counters are the change from here
        norms = features.directions.norm(dim=1)
        unit = features.directions / norms[:, None].clamp_min(1e-12)
        units, describe, extra, kind, pairing = self._select(features, data)
        store = self._checkpoints(data)
        for u in units:
            u.direction = unit[u.feature]
            if store is not None:
                u.restore(store.load(u.key, u.direction), store.load(u.key, u.direction, GENERATED))
        todo = [u for u in units if not u.finished]
        if todo:
            steered = {}
            if self.post_norm_mlp_out:
                steered = post_norm_targets(model, features, unit, [u.feature for u in todo])
            fresh = [u for u in todo if u.texts is None]  # neither generated nor judged yet
            with data.stage("steering:describe"):
                if describe is None:  # the feature protocols: one description kind for all
                    describe = self._describer(model, features, data, judge, fresh, unit, steered)
                for u in tqdm(fresh, desc="steering: describe", unit=self.protocol, leave=False):
                    self._prepare(
                        u,
                        model,
                        features.hook,
                        float(norms[u.feature]),
                        unit,
                        steered,
                        describe,
                        judge,
                    )
            with data.stage("steering:calibrate"):
                for u in tqdm(fresh, desc="steering: calibrate", unit=self.protocol, leave=False):
                    self._calibrate(model, u)
            with data.stage("steering:generate") as record:
                unsteered = self._baseline(features.hook, unit.shape[1], data.seed)
                baseline = self._generate(model, fresh, data.seed, store, unsteered, record)
            with data.stage("steering:judge"):
                self._judge_all(todo, baseline, judge, store)
        stats = {k: v - start.get(k, 0.0) for k, v in judge.stats().items()}
        for u in units:  # the counters of work done before the job was interrupted
            for k, v in u.earlier.items():
                stats[k] = stats.get(k, 0.0) + v
        rows = [{**row, **extra.get(u.name, {})} for u in units for row in u.rows]
        # aggregate: per unit, then the summary with intervals over units
        per = "concept" if self.protocol == "concept" else "feature"
        rows += aggregate(
            rows,
            [u.name for u in units],
            passes={u.name: u.passes for u in units},
            judge_stats=stats,
            seed=data.seed,
            n_resamples=self.bootstrap,
            unit=per,
            units_hash=pairing,
            settings=json.dumps(self.resolved()),
        )
        for row in rows:
            row.setdefault("judge", type(judge).name or type(judge).__name__.lower())
            row.setdefault("judge_label", judge.label())
            row.setdefault("judge_failure_policy", self.judge_failure)
            row.setdefault("description", kind)
            row.setdefault("protocol", self.protocol)
            row.setdefault("direction", self.direction)
        return rows

    # --- select and describe ---------------------------------------------------------

    def _select(self, features: Features, data: TaskData) -> tuple:
        """(units, describe or None, per-unit extra columns, description kind, pairing hash).
        A unit's key names its checkpoint and seeds its samples: the feature index under
        the feature protocols, the concept's position under the concept protocol."""
        if self.protocol == "concept":
            picked, feature_of, describe, extra = self._concept_units(features, data)
            units = [Unit(c, feature_of[c], i) for i, c in enumerate(picked)]
            return units, describe, extra, "label", units_hash(data.dataset.content_hash, picked)
        chosen = select_features(len(features), self.max_features, data.seed)
        return [Unit(f, f, f) for f in chosen], None, {}, self.description, None

    def _describer(self, model, features, data, judge, fresh: list[Unit], unit, steered):
        """The feature protocols' describer, built once for the units still to describe."""
        split = data.dataset.indices("train")
        encodings = data.encodings(features)  # the job's codes: nothing encoded twice
        wanted = fresh and self.description in INPUT_CENTRIC  # kinds that read train codes
        codes = encodings.tokens()[encodings.rows(split)] if wanted else None
        return Describer(
            self.description,
            model,
            features,
            data.activations.subset(split),
            judge,
            [u.feature for u in fresh],
            unit,
            self.top_tokens,
            codes=codes,
            steered=steered,
        )

    def _prepare(self, u: Unit, model, hook: str, norm: float, unit, steered, describe, judge):
        """The unit's description and what is steered: the feature's direction at the
        features' hook, its post-norm image (Gemma, `post_norm_mlp_out`), or the DiffMean of
        sentences written from its description (`direction=generated_diffmean`)."""
        before = judge.stats()
        u.desc = describe(u.name).for_signs(self.description_signs)
        u.hook, u.vector, u.norm = hook, unit[u.feature], norm
        if u.feature in steered:
            u.vector, u.hook = steered[u.feature]
        if self.direction == "generated_diffmean" and u.desc.texts:  # (none: undescribed)
            u.hook, u.vector, u.norm, why, u.info = self._generated_diffmean(
                model, u.hook, u.desc, judge
            )
            if u.vector is None:
                u.rows = [failure_row(u.feature, u.desc, NO_DIRECTION, why)]
        u.add_stats(judge.stats(), before)

    def _generated_diffmean(self, model, hook: str, desc: Description, judge) -> tuple:
        """(hook, unit vector or None, its norm, why None, row info): the paper's DiffMean of
        sentences written from the feature's description, at the layer's hook_mlp_out."""
        hook = hook_name(layer_of(hook), "mlp_out")
        vector, why, info = generated_diffmean(model, hook, desc.texts[1], judge, self.diffmean_bos)
        return hook, vector, 1.0, why, info

    def _concept_units(self, features: Features, data: TaskData) -> tuple:
        """The concept protocol's units: (concepts, concept -> feature, describe, concept ->
        extra columns): a seeded sample of `concepts` concepts (`concept_seed`), each with the
        method's feature for it (`bench.tasks.detection.concept_units`), described by its label
        and read through its train sentences."""
        picked, feature_of, examples, extra = concept_units(
            features, data, self.concepts, self.concept_seed
        )
        return picked, feature_of, lambda c: label(c, examples[c]), extra

    # --- calibrate, generate, judge ----------------------------------------------------

    def _calibrate(self, model, u: Unit) -> None:
        """The unit's alpha for each (KL target, sign) it is judged on; a target not found
        is a row with its reason. A zero or undescribed unit is not searched."""
        f, desc = u.feature, u.desc
        if u.rows:  # already failed (no direction to steer)
            return
        if not u.norm > 1e-12:  # NaN too
            why = "zero-norm direction" if np.isfinite(u.norm) else "non-finite direction"
            u.rows = [failure_row(f, desc, ZERO_NORM, why)]
            return
        u.rows = [failure_row(f, desc, EXCLUDED, why, sign=s) for s, why in desc.excluded.items()]
        if not desc.texts:
            u.rows = u.rows or [failure_row(f, desc, UNDESCRIBED, desc.reason)]
            return
        found, u.passes = calibrate(model, u.hook, u.vector, self, signs=desc.signs)
        for (t, sign), (alpha, kl, reason) in sorted(found.items()):
            if alpha is None:
                u.rows.append(
                    failure_row(
                        f, desc, UNREACHABLE, reason, self.kl_targets[t], sign, kl_achieved=kl
                    )
                )
            else:
                u.jobs.append((t, sign, float(alpha), kl))

    def _specs(self, u: Unit, seed: int) -> list[Row]:
        """The unit's rows to generate: `samples` per (KL target, sign) found, each with
        its own seed key (seed, unit key + 1, target, sign + 1, sample)."""
        return [
            Row(prompt, alpha * u.vector, (seed, u.key + 1, t, sign + 1, s), u.hook)
            for t, sign, alpha, _ in u.jobs
            for s, prompt in enumerate(self._sample_prompts())
        ]

    def _generate(
        self,
        model,
        units: list[Unit],
        seed: int,
        store: Checkpoints | None,
        baseline: list[Row],
        counted: dict | None = None,
    ) -> list[str]:
        """The baseline's rows, then every unit's, in full batches; each unit's texts are
        checkpointed as soon as its last row is generated, so a killed job regenerates only
        unfinished units. Returns the baseline's texts; `counted["tokens"]` counts the tokens
        generated (`generate_batches`)."""
        out: list[str] = [""] * len(baseline)
        specs, owner = list(baseline), [(None, j) for j in range(len(baseline))]
        for u in units:
            mine = self._specs(u, seed)
            u.texts = [None] * len(mine)
            owner += [(u, j) for j in range(len(mine))]
            specs += mine
            if not mine:
                self._save(store, u, GENERATED)
        left = {id(u): len(u.texts) for u in units}
        for index, texts in generate_batches(model, "", specs, self, counted):
            for i, text in zip(index, texts, strict=True):
                u, j = owner[i]
                if u is None:
                    out[j] = text
                    continue
                u.texts[j] = text
                left[id(u)] -= 1
                if left[id(u)] == 0:
                    self._save(store, u, GENERATED)
        return out

    def _judge_all(self, units: list[Unit], baseline, judge, store: Checkpoints | None) -> None:
        """Judge every unit's texts in chunks of units holding about a batch of texts (the
        judge sees a chunk's texts together); the chunk's judge counters go to its first
        unit, so their sum is the task's. Each unit is checkpointed once judged."""
        chunk: list[Unit] = []
        for i, u in enumerate(units):
            chunk.append(u)
            if sum(len(v.texts or []) for v in chunk) >= self.batch_size or i == len(units) - 1:
                before = judge.stats()
                judge_units(self, chunk, baseline, judge)
                chunk[0].add_stats(judge.stats(), before)
                for v in chunk:
                    self._save(store, v)
                chunk = []

    def _checkpoints(self, data: TaskData) -> Checkpoints | None:
        """The job's steering checkpoints; None (with a warning) without a checkpoint key."""
        if not data.checkpoint_key:
            log.warning("steering: no checkpoint key, so this run cannot resume if it stops")
            return None
        # one folder per settings: two steering tasks of a job (output_centric) share features
        settings = sha256_json({f.name: getattr(self, f.name) for f in fields(self)})[:12]
        return Checkpoints(
            data.output_dir / "checkpoints" / f"steering-{self.protocol}-{settings}",
            data.checkpoint_key,
            version=CHECKPOINT_VERSION,
        )

    def _save(self, store: Checkpoints | None, u: Unit, stage: str = JUDGED) -> None:
        """Checkpoint a unit: its texts once generated, its rows once judged."""
        if stage == JUDGED:
            u.finished = True
        if store is not None:
            store.save(u.key, u.direction, u.state(stage), stage)

    def _steer_feature(
        self,
        model,
        hook,
        f,
        direction,
        norm,
        desc: Description,
        baseline,
        judge,
        seed,
        key: int | None = None,
    ) -> dict:
        """Calibrate, generate and judge one unit (feature f, described by `desc`) through
        the same stages as `evaluate`: its rows and search passes. `key` seeds its samples
        (default: the feature index)."""
        u = Unit(f, f, f if key is None else key, desc=desc, hook=hook, vector=direction, norm=norm)
        self._calibrate(model, u)
        specs = self._specs(u, seed)
        u.texts = generate(model, hook, specs, self) if specs else []
        judge_units(self, [u], baseline, judge)
        return {"rows": u.rows, "passes": u.passes}

    def _judge(self, f, desc: Description, sign, samples, baseline, judge) -> list[dict]:
        """Rows of one sign's samples of feature f, judged against that sign's description."""
        return judge_samples(self, [(f, desc, sign, samples)], baseline, judge)[0]

    def _sample_prompts(self) -> list[str]:
        return [self.prompts[s % len(self.prompts)] for s in range(self.samples)]

    def _baseline(self, hook: str, d: int, seed: int) -> list[Row]:
        """The unsteered continuations the offline concept judge compares against."""
        zero = torch.zeros(d)
        return [
            Row(self.prompts[s % len(self.prompts)], zero, (seed, 0, 0, 0, s), hook)
            for s in range(self.baseline_samples)
        ]

"""The steering task's units and how their samples are judged.

A unit (a concept under the concept-paired protocol, else a sampled feature) goes
through the task's stages as a `Unit`: what is steered, its calibrated settings, its
texts and its rows. It is checkpointed twice: once its texts are generated
(`GENERATED`), and once they are judged (`JUDGED`), so a killed job neither generates
nor judges a unit twice.

`judge_samples` judges many groups of samples (one unit's samples at one sign, each
group against its own description) in one go: the judge sees every text first
(`Judge.prepare`, where the offline judge embeds them in one batch), and fluency is
asked once per prompt for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from bench.judges.base import Judge, Judgement
from bench.tasks.descriptions import Description
from bench.tasks.steering.scores import EMPTY, _row

GENERATED, JUDGED = "generated", "feature"  # a unit's checkpoints: its texts; its judged rows
EMPTY_REASON = "empty generation"
#: (KL target index, sign, alpha, KL at alpha): one calibrated setting a unit is generated at
Job = tuple[int, int, float, float | None]
#: one sample to judge: (its job, its sample index, its text)
Sample = tuple[Job, int, str]


@dataclass(eq=False)
class Unit:
    """One steered unit as it goes through the stages. `name` is the value of the rows'
    unit column (a concept, or a feature index); `key` names its checkpoints and seeds its
    samples."""

    name: Any
    feature: int
    key: int
    desc: Description | None = None
    hook: str = ""
    vector: torch.Tensor | None = None  # unit vector steered at `hook` (None: nothing to steer)
    norm: float = 1.0  # the direction's norm before it was made a unit vector
    direction: torch.Tensor | None = None  # the feature's unit direction: keys its checkpoints
    info: dict = field(default_factory=dict)  # extra columns on its rows
    rows: list[dict] = field(default_factory=list)  # failure rows, then the judged samples
    jobs: list[Job] = field(default_factory=list)
    passes: int = 0  # forward passes its alpha search spent
    texts: list[str] | None = None  # one per (job, sample), once generated
    judge_stats: dict[str, float] = field(default_factory=dict)
    finished: bool = False  # judged (now, or before the job was interrupted)
    earlier: dict[str, float] = field(default_factory=dict)  # judge counters of an earlier run

    def add_stats(self, after: dict[str, float], before: dict[str, float]) -> None:
        for k, v in after.items():
            self.judge_stats[k] = self.judge_stats.get(k, 0.0) + v - before.get(k, 0.0)

    def state(self, stage: str) -> dict:
        """What its checkpoint at `stage` holds (JSON)."""
        state = {"rows": self.rows, "passes": self.passes, "judge_stats": self.judge_stats}
        if stage == GENERATED:
            state.update(
                texts=self.texts,
                jobs=self.jobs,
                info=self.info,
                hook=self.hook,
                desc=_desc_state(self.desc),
            )
        return state

    def restore(self, judged: dict | None, generated: dict | None) -> None:
        """Take up where an interrupted run stopped: judged (done), or generated (to judge)."""
        saved = judged or generated
        if saved is None:
            return
        self.rows, self.passes = saved["rows"], saved["passes"]
        self.judge_stats, self.earlier = dict(saved["judge_stats"]), dict(saved["judge_stats"])
        self.finished = judged is not None
        if not self.finished:
            self.texts, self.info, self.hook = saved["texts"], saved["info"], saved["hook"]
            self.jobs = [tuple(job) for job in saved["jobs"]]
            self.desc = _desc_from(saved["desc"])

    def groups(self, samples: int) -> list[tuple[int, list[Sample]]]:
        """(sign, its samples) for each sign it is judged on, once its texts are generated."""
        if not self.texts:
            return []
        out = []
        for sign in self.desc.signs:
            mine = [(j, job) for j, job in enumerate(self.jobs) if job[1] == sign]
            out.append(
                (
                    sign,
                    [
                        (job, s, self.texts[j * samples + s])
                        for j, job in mine
                        for s in range(samples)
                    ],
                )
            )
        return out


def _desc_state(desc: Description | None) -> dict | None:
    """A description as JSON (its signs as lists of pairs: JSON keys are strings)."""
    if desc is None:
        return None
    return {
        "kind": desc.kind,
        "texts": list(desc.texts.items()),
        "concept": desc.concept,
        "reason": desc.reason,
        "excluded": list(desc.excluded.items()),
        "examples": list(desc.examples),
    }


def _desc_from(state: dict | None) -> Description | None:
    if state is None:
        return None
    return Description(
        state["kind"],
        {int(s): t for s, t in state["texts"]},
        state["concept"],
        state["reason"],
        {int(s): w for s, w in state["excluded"]},
        tuple(state["examples"]),
    )


# --- judging ----------------------------------------------------------------------


class JudgingSettings(Protocol):
    """What judging reads (the steering task has these fields)."""

    prompts: list[str]
    kl_targets: list[float]
    judged_text: str  # continuation | bos_prompt_continuation (the text holds its prompt)
    judge_failure: str  # missing | zero
    negative_alpha: str  # calibrated | mirrored (a mirrored -1 sign is not calibrated)


#: one group to judge: (feature, its description, the sign, that sign's samples)
Group = tuple[int, Description, int, list[Sample]]


def judge_units(settings: Any, units: list[Unit], baseline: list[str], judge: Judge) -> None:
    """Each unit's sample rows, after its failure rows (with its extra columns: the
    sentences written under generated_diffmean)."""
    groups, owner = [], []
    for u in units:
        for sign, samples in u.groups(settings.samples):
            groups.append((u.feature, u.desc, sign, samples))
            owner.append(u)
    judged = judge_samples(settings, groups, baseline, judge) if groups else []
    for u in units:
        mine = [row for v, rows in zip(owner, judged, strict=True) if v is u for row in rows]
        u.rows = [{**row, **u.info} for row in u.rows + mine]


def judge_samples(
    settings: JudgingSettings, groups: Sequence[Group], baseline: list[str], judge: Judge
) -> list[list[dict]]:
    """Rows of each group's samples, each judged against its sign's description. An empty
    text scores 0 unjudged (the steering broke the model, not the judge); a failed
    judgement is missing or 0 by `judge_failure`, and marked `judge_failed`."""
    holds = settings.judged_text == "bos_prompt_continuation"
    asked = [
        (g, i)
        for g, (_, _, _, samples) in enumerate(groups)
        for i, (_, _, text) in enumerate(samples)
        if text.strip()
    ]
    texts = [groups[g][3][i][2] for g, i in asked]
    judge.prepare(texts)
    # a text that holds its prompt is rated alone (the reference's fluency rubric)
    prompts = ["" if holds else _prompt(settings, groups[g][3][i][1]) for g, i in asked]
    fluency = dict(zip(asked, _fluency(judge, texts, prompts), strict=True))
    concept: dict[tuple[int, int], Judgement] = {}
    for g, (_, desc, sign, samples) in enumerate(groups):
        mine = [i for i, (_, _, text) in enumerate(samples) if text.strip()]
        if mine:
            judged = judge.concept(
                [samples[i][2] for i in mine],
                desc.texts[sign],
                baseline,
                kind=desc.kind,
                examples=desc.examples or None,
            )
            concept.update({(g, i): j for i, j in zip(mine, judged, strict=True)})
    return [_rows(settings, g, group, concept, fluency) for g, group in enumerate(groups)]


def _rows(settings: JudgingSettings, g: int, group: Group, concept: dict, fluency: dict) -> list:
    f, desc, sign, samples = group
    empty = Judgement(0.0, EMPTY_REASON)
    description = desc.texts[sign]
    mirrored = settings.negative_alpha == "mirrored" and sign == -1
    rows = []
    for i, ((t, _, alpha, kl), s, text) in enumerate(samples):
        common = {
            "alpha": alpha,
            "kl_achieved": kl,
            "sample": s,
            "prompt": _prompt(settings, s),
            "text": text,
            "description_text": description,
            "alpha_calibrated": not mirrored,
            "failure": None if text.strip() else EMPTY,
        }
        judged_c, judged_f = concept.get((g, i), empty), fluency.get((g, i), empty)
        failed_c, failed_f = judged_c.score is None, judged_f.score is None
        c, fl = _policy(settings, judged_c), _policy(settings, judged_f)
        score = steering_score(c.score, fl.score)
        reasons = "; ".join(dict.fromkeys(r for r in (c.reason, fl.reason) if r))
        for metric, value, reason, failed in (
            ("concept_score", c.score, c.reason, failed_c),
            ("fluency_score", fl.score, fl.reason, failed_f),
            ("steering_score", score, reasons or None, failed_c or failed_f),
        ):
            rows.append(
                _row(
                    f,
                    desc.concept,
                    metric,
                    value,
                    settings.kl_targets[t],
                    sign,
                    reason=reason,
                    judge_failed=failed,
                    **common,
                )
            )
    return rows


def _prompt(settings: JudgingSettings, sample: int) -> str:
    return settings.prompts[sample % len(settings.prompts)]


def _policy(settings: JudgingSettings, judgement: Judgement) -> Judgement:
    """A failed judgement under `judge_failure=zero` scores 0, its reason kept."""
    if judgement.score is None and settings.judge_failure == "zero":
        return Judgement(0.0, f"{judgement.reason} (scored 0: judge_failure=zero)")
    return judgement


def steering_score(concept: float | None, fluency: float | None) -> float | None:
    """Harmonic mean of the two 0-2 scores; 0 when either is 0, missing when either is."""
    if concept is None or fluency is None:
        return None
    if concept == 0 or fluency == 0:
        return 0.0
    return 2 * concept * fluency / (concept + fluency)


def _fluency(judge: Judge, texts: list[str], prompts: list[str]) -> list[Judgement]:
    """Fluency of every text, asked once per distinct prompt."""
    out: list[Judgement | None] = [None] * len(texts)
    for prompt in dict.fromkeys(prompts):
        where = [i for i, p in enumerate(prompts) if p == prompt]
        for i, j in zip(where, judge.fluency([texts[i] for i in where], prompt), strict=True):
            out[i] = j
    return out  # type: ignore[return-value]


def failure_row(f, desc: Description, failure, reason, kl_target=None, sign=None, **extra) -> dict:
    """A sample-less `steering_score` row saying why nothing was generated or judged."""
    return _row(
        f,
        desc.concept,
        "steering_score",
        None,
        kl_target,
        sign,
        sample=None,
        failure=failure,
        reason=reason,
        **extra,
    )

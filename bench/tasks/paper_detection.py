"""Concept detection under the SNMF paper's protocol (`task.concept_detection.protocol=paper`):
per sampled feature, a writing judge describes it, writes sentences that should and
should not activate it, and the feature's scores on them give S_CD; summaries over the
features. The task (`featbench.tasks.concept_detection`) states the protocol; this is its
mechanics."""

from __future__ import annotations

import json
import logging
from typing import Any

from bench import stats
from bench.core.storage import atomic_write_text
from bench.fit.features import Features
from bench.tasks.base import TaskData
from bench.tasks.descriptions import INPUT_TOP, Describer
from bench.tasks.detection import fmt_estimate, select_features, summarize_reasons
from bench.tasks.sentences import score_sentences, write_sentences

log = logging.getLogger(__name__)

#: items the writer reads per description kind: the paper's top 10 contexts, or 8 top tokens
DESCRIPTIONS = {"input_centric": INPUT_TOP, "tokens": 8}


def paper_detection(task: Any, model: Any, features: Features, data: TaskData) -> list[dict]:
    """Describe -> write sentences -> score them -> S_CD, per feature; summaries over
    features (units: the features scored, `paired_over` feature)."""
    judge = data.judge
    start = judge.stats()  # this task's judge counters are the change from here
    chosen = select_features(len(features), task.max_features, data.seed)
    split = data.dataset.indices("train")
    encodings = data.encodings(features)  # the job's codes: the descriptions' evidence
    unit = features.directions / features.directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    describe = Describer(
        task.description,
        model,
        features,
        data.activations.subset(split),
        judge,
        chosen,
        unit,
        DESCRIPTIONS[task.description],
        codes=encodings.tokens()[encodings.rows(split)],
    )
    rows: list[dict] = []
    record = []
    for f in chosen:
        desc = describe(f)
        entry = {"feature": f, "description": desc.texts.get(1), "reason": desc.reason}
        if not desc.texts:
            rows += [
                {
                    "feature": f,
                    "metric": "s_cd",
                    "value": None,
                    "encoder": e,
                    "reason": f"undescribed: {desc.reason}",
                }
                for e in task.encoders
            ]
            record.append(entry)
            continue
        written = write_sentences(judge, desc.texts[1], task.sentences, task.max_failed_tries)
        scored, entry["scores"] = score_sentences(model, features, f, written, task.encoders)
        entry.update(
            activating=written.activating,
            neutral=written.neutral,
            failed_tries=written.failures,
        )
        rows += [{**row, "description_text": desc.texts[1]} for row in scored]
        record.append(entry)
    atomic_write_text(
        data.output_dir / "generated_sentences.json",
        json.dumps(record, indent=1, ensure_ascii=False),
    )
    for encoder in task.encoders:
        rows += _summary(task, [r for r in rows if r.get("encoder") == encoder], encoder, data.seed)
    rows += [
        {"metric": f"judge_{k}", "value": float(v - start.get(k, 0.0))}
        for k, v in judge.stats().items()
    ]
    name = type(judge).name or type(judge).__name__.lower()
    for row in rows:
        row.update(protocol="paper", judge=name, judge_label=judge.label())
    return rows


def _summary(task: Any, rows: list[dict], encoder: str, seed: int) -> list[dict]:
    values = [r["value"] for r in rows]
    positive = [float(v is not None and v > 0) for v in values]  # undefined: not positive
    frac = stats.mean_estimate(
        positive, paired_over="feature", n_resamples=task.resamples, seed=seed
    )
    mean = stats.mean_estimate(values, paired_over="feature", n_resamples=task.resamples, seed=seed)
    undefined = [r["reason"] for r in rows if r["value"] is None]
    log.info(
        "concept_detection (paper, %s): %d features, S_CD > 0 for %s, %d undefined",
        encoder,
        len(rows),
        fmt_estimate(frac),
        len(undefined),
    )
    return [
        {
            "metric": "frac_s_cd_positive",
            **frac.row(),
            "n_defined": len(rows) - len(undefined),
            "encoder": encoder,
            "reason": summarize_reasons(undefined) or None,
        },
        {"metric": "mean_s_cd", **mean.row(), "encoder": encoder},
        {
            "metric": "undescribed_features",
            "value": float(sum("undescribed" in (r or "") for r in undefined)),
            "n": len(rows),
            "encoder": encoder,
        },
    ]

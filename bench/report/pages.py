"""features.md: per job, its top features with their description, top-activating contexts
and steered samples, so a reader can see what a number in report.md is made of.
"""

from __future__ import annotations

import pandas as pd

from bench.report.common import Job, contexts_of, inline, num, place, sign_text

SAMPLES_SHOWN = 3  # steered samples listed per feature, best first
# A feature's best-over-KL steering score (the paper's); `best_steering_score` in older jobs.
BEST = ("best_kl_steering_score", "best_steering_score")


def features_page(jobs: list[Job], top: int) -> str:
    """The whole page: per job, up to `top` features, steered ones first."""
    lines = [
        "# featbench: features",
        "",
        f"Per job, up to {top} features: the steered ones first (by `best_kl_steering_score`), "
        "then by concept-detection AUROC. Contexts mark the top token as [[token]].",
        "",
    ]
    for job in jobs:
        first = job.rows.iloc[0]
        where = place(job.rows).iloc[0]
        name = first["setting"] if "setting" in job.rows else job.method
        lines += [f"## {name} · job `{job.name}` · {where} · seed {first['seed']}", ""]
        ranked = _ranked_features(job.rows)[:top]
        if not ranked:
            lines += ["No per-feature rows (neither steering nor concept detection ran).", ""]
        for feature in ranked:
            lines += _feature_block(job, feature)
    return "\n".join(lines)


def _ranked_features(rows: pd.DataFrame) -> list[int]:
    """Features by best steering score, then the rest by concept-detection AUROC."""
    rows = rows[rows["feature"].notna()]
    best = rows[rows["metric"].isin(BEST)]
    auroc = rows[(rows["task"] == "concept_detection") & (rows["metric"] == "auroc")]
    parts = [p.sort_values("value", ascending=False, na_position="last") for p in (best, auroc)]
    return list(dict.fromkeys(int(f) for part in parts for f in part["feature"]))


def _feature_block(job: Job, feature: int) -> list[str]:
    """One feature's heading (its best numbers), description, contexts and samples."""
    rows = job.rows[job.rows["feature"] == feature]
    facts = []
    for _, best in rows[rows["metric"].isin(BEST)].head(1).iterrows():
        where = (
            f" (KL {best['kl_target']:g}, {sign_text(best['sign'])})"
            if pd.notna(best["sign"])
            else ""
        )
        facts.append(f"best steering {num(best['value'])}{where}")
    auroc = rows[(rows["task"] == "concept_detection") & (rows["metric"] == "auroc")]
    for _, auc in auroc.head(1).iterrows():
        facts.append(f"AUROC {num(auc['value'])} for `{auc['concept']}`")
    out = [f"### feature {feature}" + "".join(f" · {fact}" for fact in facts), ""]
    steering = rows[rows["task"] == "steering"]
    if "description_text" in steering and steering["description_text"].notna().any():
        described = steering.dropna(subset=["description_text"]).drop_duplicates("description_text")
        signed = len(described) > 1  # output-centric descriptions differ by sign
        texts = [
            (f"{sign_text(r['sign'])}: " if signed else "") + inline(r["description_text"])
            for _, r in described.iterrows()
        ]
        out += [f"Description: {'; '.join(texts)}", ""]
    contexts = contexts_of(job, feature)
    if contexts:
        out += ["Top-activating contexts:", ""]
        for c in contexts:
            token = inline(c.get("token", "")).strip() or " "
            out.append(f"- {num(c.get('score'))} `{token}`: {inline(c.get('context'))}")
        out.append("")
    samples = _samples(steering)[:SAMPLES_SHOWN]
    if samples:
        out += ["Steered samples (best first):", ""]
        for scores, kl, sign, text in samples:
            judged = ", ".join(f"{k.removesuffix('_score')} {num(v)}" for k, v in scores.items())
            out.append(f"- KL {kl:g}, {sign_text(sign)} · {judged}: “{inline(text)}”")
        out.append("")
    return out


def _samples(steering: pd.DataFrame) -> list[tuple[dict, float, int, str]]:
    """Per steered sample: its scores by metric, KL target, sign and text; best first."""
    if "sample" not in steering or "text" not in steering:
        return []
    rows = steering[steering["sample"].notna() & steering["text"].notna()]
    order = ["steering_score", "concept_score", "fluency_score"]
    out = []
    for (kl, sign, _), part in rows.groupby(["kl_target", "sign", "sample"]):
        scores = dict(zip(part["metric"], part["value"], strict=True))
        scores = {k: scores[k] for k in order if k in scores}
        best = scores.get("steering_score")
        rank = -1.0 if best is None or pd.isna(best) else float(best)
        out.append((rank, scores, float(kl), int(sign), str(part["text"].iloc[0])))
    return [sample[1:] for sample in sorted(out, key=lambda sample: -sample[0])]

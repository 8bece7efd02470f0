"""index.html's feature cards: per feature of a job, its description and kind, its matched
concept with AUROC and S_CD per encoder, its top contexts with each token shaded by the
feature's activation, and its steered samples per KL target and sign with their scores.

A card only renders the job's rows and its `features/contexts.json`; nothing is recomputed.
`gallery_section` lays out, per job, the features that were steered or matched to a concept
(best feature of a concept), then, hidden until a link opens them, a hierarchical SNMF job's
other tree nodes.
"""

from __future__ import annotations

import json
import logging
from html import escape
from typing import Any
from urllib.parse import quote

import pandas as pd

from bench.report.common import Job, contexts_of, num, place, sign_text

log = logging.getLogger(__name__)

SHOWN = {False: (5, 15), True: (3, 8)}  # (contexts, tokens each side of the top one) shown on
# a gallery card (False) and on a card that is only a hierarchy node (True)
SHADES = 9  # activation levels of token shading (CSS classes p1..p9 and n1..n9)
SCORES = ("concept_score", "fluency_score", "steering_score")
HELDOUT, BEST = "heldout_steering_score", "best_kl_steering_score"
OPTIONAL = (  # task columns a card reads; a job without one has it missing
    "encoder",
    "concept",
    "selected_feature",
    "kl_target",
    "sign",
    "sample",
    "prompt",
    "text",
    "alpha",
    "kl_achieved",
    "failure",
    "reason",
    "description_text",
    "description",
    "protocol",
    "match_auroc",
)


def complete(job: Job) -> Job:
    """The job with every OPTIONAL column in its rows (missing values where it had none)."""
    absent = [c for c in OPTIONAL if c not in job.rows]
    return job._replace(rows=job.rows.assign(**dict.fromkeys(absent, pd.NA))) if absent else job


def anchor(kind: str, *parts: Any) -> str:
    """An element id that is also its permalink's hash: `feature:JOB:7`, `concept:food`."""
    return ":".join([kind, *("_".join(str(p).split()) for p in parts)])


def href(target: str) -> str:
    """The escaped `href` attribute value of a link to the element with id `target`."""
    return escape("#" + quote(target, safe="=:,;/-_.~@+"))


def feature_link(job: Job, feature: int, text: str | None = None) -> str:
    """A link that opens one feature's card."""
    label = escape(text if text is not None else f"feature {feature}")
    return f'<a href="{href(anchor("feature", job.name, feature))}">{label}</a>'


def setting_of(job: Job) -> str:
    """The job's setting label (its method when the rows have none)."""
    rows = job.rows
    return str(rows["setting"].iloc[0]) if "setting" in rows and len(rows) else job.method


def gallery_section(jobs: list[Job]) -> str:
    """Per job, a card per steered or matched feature, then its hidden tree-node cards."""
    parts = [
        '<section id="features"><h2>Features</h2>',
        '<p class="note">Per job, the features that were steered or are the best match of a '
        "concept, steered first. Tokens are shaded by the feature's activation (orange "
        "positive, blue negative, relative to the card's largest); hover a token for its "
        "value. The link symbol of a card is its permalink.</p>",
    ]
    for job in jobs:
        shown, roles = gallery_features(job)
        first = job.rows.iloc[0]
        title = f"{setting_of(job)} · job {job.name} · {place(job.rows).iloc[0].replace('`', '')}"
        parts.append(
            f'<section class="job" data-method="{escape(job.method)}">'
            f"<h3>{escape(title)} · seed {escape(str(first['seed']))}</h3>"
        )
        if not shown:
            parts.append('<p class="note">No steered or matched feature in this job.</p>')
        cards = [feature_card(job, f, roles.get(f, [])) for f in shown]
        others = [f for f in tree_nodes(job) if f not in set(shown)]
        cards += [feature_card(job, f, ["tree node"], extra=True) for f in others]
        parts.append('<div class="cards">' + "".join(cards) + "</div></section>")
    return "\n".join(parts) + "</section>"


def gallery_features(job: Job) -> tuple[list[int], dict[int, list[str]]]:
    """The job's steered features (best held-out score first), then its concepts' best
    features (by AUROC); and per feature its roles (`steered`, `best for food`)."""
    rows = job.rows[job.rows["feature"].notna()]
    roles: dict[int, list[str]] = {}
    steered = rows[(rows["task"] == "steering") & (rows["metric"] == HELDOUT)]
    steered = steered.sort_values("value", ascending=False, na_position="last")
    for f in steered["feature"].astype(int):
        roles.setdefault(int(f), ["steered"])
    best = job.rows[
        (job.rows["metric"] == "concept_best_auroc") & job.rows["selected_feature"].notna()
    ]
    best = best.sort_values("value", ascending=False, na_position="last")
    for row in best.to_dict("records"):
        role = f"best for {row['concept']}" + (
            f" ({row['encoder']})" if _has(row, "encoder") else ""
        )
        roles.setdefault(int(row["selected_feature"]), []).append(role)
    return list(roles), roles


def tree_nodes(job: Job) -> list[int]:
    """Every feature of a hierarchical SNMF job's levels (none for other jobs)."""
    levels = job.info.get("levels") if "edges" in job.info else None
    if not isinstance(levels, list):
        return []
    return [f for level in levels for f in range(int(level["start"]), int(level["stop"]))]


def feature_card(job: Job, feature: int, roles: list[str], extra: bool = False) -> str:
    """One feature's card (an <article> whose id is its permalink)."""
    rows = job.rows[job.rows["feature"] == feature]
    detect = rows[rows["task"] == "concept_detection"]
    steering = rows[rows["task"] == "steering"]
    target = anchor("feature", job.name, feature)
    aurocs = _values(detect, "auroc")
    heldout = _values(steering, HELDOUT)
    concepts = sorted({str(c) for c in rows["concept"].dropna()})
    data = {
        "method": job.method,
        "concepts": json.dumps(concepts),
        "auroc": _max(aurocs),
        "steering": _max(heldout),
        "scd": _max(_values(detect, "s_cd")),
    }
    attrs = " ".join(f'data-{k}="{escape(str(v))}"' for k, v in data.items())
    badges = "".join(f'<span class="badge">{escape(r)}</span>' for r in roles)
    head = (
        f'<header><a class="permalink" href="{href(target)}" title="permalink">#</a> '
        f"<b>{escape(setting_of(job))}</b> · feature {feature} {badges}</header>"
    )
    body = [
        _description(steering),
        _detection(detect),
        _steering_facts(steering),
        _contexts(contexts_of(job, feature), *SHOWN[extra]),
        _samples(steering),
    ]
    hidden = ' class="card extra" hidden' if extra else ' class="card"'
    return f'<article id="{escape(target)}"{hidden} {attrs}>{head}{"".join(body)}</article>'


def _description(steering: pd.DataFrame) -> str:
    """The steering descriptions (per sign when they differ), each with its kind."""
    out = []
    if "description_text" in steering:
        described = steering.dropna(subset=["description_text"])
        for row in described.drop_duplicates(["description_text", "sign"]).to_dict("records"):
            kind = row.get("description") if _has(row, "description") else "description"
            sign = f" ({sign_text(row['sign'])})" if _has(row, "sign") else ""
            out.append(
                f'<span class="kind">{escape(str(kind))}{escape(sign)}</span> '
                f"{escape(str(row['description_text']))}"
            )
    if not out:
        return ""
    return '<p class="desc">' + "<br>".join(dict.fromkeys(out)) + "</p>"


def _detection(detect: pd.DataFrame) -> str:
    """Per encoder: the matched concept, its test AUROC and the feature's S_CD."""
    if detect.empty:
        return ""
    items = []
    for encoder, part in detect.groupby(detect["encoder"].fillna(""), sort=True):
        auroc = part[part["metric"] == "auroc"].head(1)
        scd = part[part["metric"] == "s_cd"].head(1)
        concept = str(auroc["concept"].iloc[0]) if len(auroc) else "—"
        value = num(auroc["value"].iloc[0]) if len(auroc) else "—"
        items.append(
            f'<li><span class="kind">{escape(str(encoder) or "encoder")}</span> '
            f"matched <b>{escape(concept)}</b> · AUROC {value} · S_CD "
            f"{num(scd['value'].iloc[0]) if len(scd) else '—'}</li>"
        )
    return '<ul class="facts">' + "".join(items) + "</ul>"


def _steering_facts(steering: pd.DataFrame) -> str:
    """Per steered unit (concept): the held-out and best-over-KL scores with their target."""
    items = []
    for row in steering[steering["metric"].isin([HELDOUT, BEST])].to_dict("records"):
        where = (
            f" at KL {row['kl_target']:g}, {sign_text(row['sign'])}" if _has(row, "sign") else ""
        )
        why = f" ({row['reason']})" if _has(row, "reason") else ""
        concept = f" for {row['concept']}" if _has(row, "concept") else ""
        name = "held-out" if row["metric"] == HELDOUT else "best over KL"
        items.append(
            f"<li>{name} steering score <b>{num(row['value'])}</b>"
            f"{escape(concept + where + why)}</li>"
        )
    match = steering["match_auroc"].dropna() if "match_auroc" in steering else []
    if len(match):
        items.append(f"<li>train AUROC of the match {num(match.iloc[0])}</li>")
    return '<ul class="facts">' + "".join(items) + "</ul>" if items else ""


def _contexts(contexts: list[dict], shown: int, window: int) -> str:
    """The first `shown` contexts, `window` tokens each side of the top one, each token
    shaded by its activation relative to the largest."""
    contexts = contexts[:shown]
    if not contexts:
        return ""
    peak = max(
        [abs(float(c.get("score") or 0.0)) for c in contexts]
        + [abs(float(a)) for c in contexts for a in _acts(c)]
        + [1e-12]
    )
    lines = [
        f'<li><span class="score">{num(c.get("score"))}</span> {_tokens(c, peak, window)}</li>'
        for c in contexts
    ]
    return '<ol class="contexts">' + "".join(lines) + "</ol>"


def _tokens(context: dict, peak: float, window: int) -> str:
    """One context's tokens as shaded spans; an older contexts.json (no per-token values):
    its text with the top token marked."""
    tokens, acts = context.get("tokens"), _acts(context)
    if not isinstance(tokens, list) or len(tokens) != len(acts):
        text = str(context.get("context", ""))
        before, _, rest = text.partition("[[")
        token, _, after = rest.rpartition("]]") if "]]" in rest else (rest, "", "")
        return f'{_text(before)}<span class="tok p{SHADES} top">{_text(token)}</span>{_text(after)}'
    top = context.get("top") if isinstance(context.get("top"), int) else 0
    lo, hi = max(0, top - window), top + window + 1
    out = ["…"] if lo > 0 else []
    for i, (token, act) in enumerate(zip(tokens, acts, strict=True)):
        if not lo <= i < hi:
            continue
        level = min(SHADES, round(SHADES * abs(act) / peak))
        classes = ([f"{'p' if act > 0 else 'n'}{level}"] if level else []) + (
            ["top"] if i == top else []
        )
        title = f' title="{act:.3g}"' if classes else ""
        text = _text(str(token))
        out.append(
            f'<span class="tok {" ".join(classes)}"{title}>{text}</span>' if classes else text
        )
    return "".join(out + (["…"] if hi < len(tokens) else []))


def _samples(steering: pd.DataFrame) -> str:
    """Steered samples grouped per (concept, KL target, sign), with alpha and the KL reached."""
    if "sample" not in steering or "text" not in steering:
        return ""
    rows = steering[steering["sample"].notna()]
    if rows.empty:
        return ""
    keys = ["concept", "kl_target", "sign"]
    several = rows["concept"].nunique() > 1
    parts = []
    for (concept, kl, sign), part in rows.groupby(keys, dropna=False, sort=True):
        title = (
            f"{concept} · " if several and pd.notna(concept) else ""
        ) + f"KL {kl:g} · {sign_text(sign)}"
        parts.append(sample_group(part, title, kl))
    return '<div class="samples">' + "".join(parts) + "</div>"


def sample_group(part: pd.DataFrame, title: str, kl: float) -> str:
    """One (KL target, sign)'s samples: alpha and KL reached, then each text and its scores."""
    first = part.iloc[0]
    alpha = f" · α {num(first['alpha'])}" if _has(first, "alpha") else ""
    reached = f" (KL reached {num(first['kl_achieved'])})" if _has(first, "kl_achieved") else ""
    items = []
    for sample, rows in part.groupby("sample", sort=True):
        scores = dict(zip(rows["metric"], rows["value"], strict=True))
        judged = " · ".join(
            f"{m.removesuffix('_score')} {num(scores.get(m))}" for m in SCORES if m in scores
        )
        row = rows.iloc[0]
        prompt = (
            f'<span class="prompt">{_text(str(row["prompt"]))}</span>'
            if _has(row, "prompt")
            else ""
        )
        failure = (
            f' <span class="kind">{escape(str(row["failure"]))}</span>'
            if _has(row, "failure")
            else ""
        )
        text = _text(str(row["text"])) if _has(row, "text") else ""
        items.append(
            f'<li><span class="scores">#{int(sample)} {escape(judged)}</span>{failure}'
            f'<div class="sample">{prompt}{text}</div></li>'
        )
    return (
        f'<details class="kl" data-kl="{kl:g}" open><summary>{escape(title + alpha + reached)}'
        f"</summary><ul>{''.join(items)}</ul></details>"
    )


def _text(text: str) -> str:
    """Model text for a `white-space: pre-wrap` element: escaped, carriage returns dropped."""
    return escape(text.replace("\r", ""))


def _acts(context: dict) -> list[float]:
    acts = context.get("acts")
    return [float(a) for a in acts] if isinstance(acts, list) else []


def _values(rows: pd.DataFrame, metric: str) -> list[float]:
    return [float(v) for v in rows.loc[rows["metric"] == metric, "value"].dropna()]


def _max(values: list[float]) -> str:
    return f"{max(values):.4g}" if values else ""


def _has(row: Any, key: str) -> bool:
    """The row has a non-missing value for `key`."""
    value = row.get(key) if hasattr(row, "get") else None
    return value is not None and not (not isinstance(value, list | dict) and pd.isna(value))

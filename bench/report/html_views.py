"""index.html's cross-method views: the concept view (for the concept-paired steering
protocol, one concept's feature from every job side by side, with their samples at one KL
target chosen on the page) and hierarchical SNMF trees (expandable; a node links to its
feature's card). Both render the jobs' rows and fit reports only.
"""

from __future__ import annotations

import logging
from html import escape
from typing import NamedTuple

import pandas as pd

from bench.report.common import Job, contexts_of, num, sign_text
from bench.report.html_features import (
    HELDOUT,
    anchor,
    feature_link,
    href,
    sample_group,
    setting_of,
    tree_nodes,
)

log = logging.getLogger(__name__)

TREE_NODES = 2000  # nodes drawn per tree at most


def concept_section(jobs: list[Job]) -> str:
    """Per concept of the concept-paired protocol, a column per job; '' when none ran it."""
    units = {job.name: _concept_rows(job) for job in jobs}
    concepts = sorted({str(c) for rows in units.values() for c in rows["concept"].dropna()})
    if not concepts:
        log.debug("index.html: no concept view (no concept-protocol steering rows)")
        return ""
    kls = sorted({float(k) for rows in units.values() for k in rows["kl_target"].dropna()})
    chosen = pd.concat(
        [rows.loc[rows["metric"] == HELDOUT, "kl_target"] for rows in units.values()]
    )
    shown = float(chosen.dropna().astype(float).mode().min()) if chosen.notna().any() else kls[0]
    options = "".join(
        f'<option value="{k:g}"{" selected" * (k == shown)}>{k:g}</option>' for k in kls
    )
    parts = [
        '<section id="concepts"><h2>Concepts side by side</h2>',
        '<p class="note">The concept-paired steering protocol: for each concept, every '
        "method steers its best-matching feature, judged against the concept's label. "
        f'Samples shown at KL target <select id="kl-target" aria-label="KL target">{options}'
        "</select> nats (at first, the target the held-out score chose most often).</p>",
    ]
    for concept in concepts:
        target = anchor("concept", concept)
        columns = [_column(job, units[job.name], concept) for job in jobs]
        parts.append(
            f'<section class="concept" id="{escape(target)}" data-concept="{escape(concept)}">'
            f'<h3><a class="permalink" href="{href(target)}" title="permalink">#</a> '
            f'{escape(concept)}</h3><div class="columns">{"".join(filter(None, columns))}'
            "</div></section>"
        )
    return "\n".join(parts) + "</section>"


def _concept_rows(job: Job) -> pd.DataFrame:
    rows = job.rows
    if "protocol" not in rows:
        return rows.iloc[:0]
    mine = (rows["task"] == "steering") & (rows["protocol"] == "concept") & rows["feature"].notna()
    return rows[mine & rows["concept"].notna()]


def _column(job: Job, rows: pd.DataFrame, concept: str) -> str:
    """One job's feature for `concept`: its scores, description and samples per KL target."""
    rows = rows[rows["concept"] == concept]
    if rows.empty:
        return ""
    feature = int(rows["feature"].iloc[0])
    facts = []
    for row in rows[rows["metric"] == HELDOUT].head(1).to_dict("records"):
        where = (
            f" at KL {row['kl_target']:g}, {sign_text(row['sign'])}"
            if pd.notna(row["sign"])
            else ""
        )
        facts.append(f"held-out steering score <b>{num(row['value'])}</b>{escape(where)}")
    match = rows["match_auroc"].dropna() if "match_auroc" in rows else []
    if len(match):
        facts.append(f"train AUROC of the match {num(match.iloc[0])}")
    described = rows["description_text"].dropna() if "description_text" in rows else []
    if len(described):
        facts.append(f"judged against “{escape(str(described.iloc[0]))}”")
    samples = rows[rows["sample"].notna()] if "sample" in rows else rows.iloc[:0]
    groups = [
        sample_group(part, f"KL {kl:g} · {sign_text(sign)}", kl)
        for (kl, sign), part in samples.groupby(["kl_target", "sign"], sort=True)
    ]
    return (
        f'<div class="column" data-method="{escape(job.method)}"><h4>{escape(setting_of(job))}'
        f' · {feature_link(job, feature)}</h4><p class="note">job {escape(job.name)}</p>'
        f'<ul class="facts">{"".join(f"<li>{f}</li>" for f in facts)}</ul>'
        f'<div class="samples">{"".join(groups)}</div></div>'
    )


def tree_section(jobs: list[Job]) -> str:
    """Each hierarchical SNMF job's tree, coarsest level as roots; '' when there is none."""
    hier = [j for j in jobs if isinstance(j.info.get("levels"), list) and "edges" in j.info]
    if not hier:
        return ""
    parts = [
        '<section id="hierarchy"><h2>SNMF hierarchy</h2>',
        '<p class="note">Coarsest features at the top. A feature can pass the edge threshold '
        "under several parents; it is drawn under the one with the largest coefficient "
        "(shown), with the number of its other parents. Click a feature to open its card. "
        '<button type="button" data-tree="open">expand all</button> '
        '<button type="button" data-tree="close">collapse all</button></p>',
    ]
    for job in hier:
        strongest: dict[int, tuple[float, int]] = {}  # child -> (coefficient, parent)
        parents: dict[int, int] = {}  # child -> how many parents it has
        for edge in job.info["edges"]:
            child, pair = int(edge["child"]), (float(edge["coefficient"]), int(edge["parent"]))
            parents[child] = parents.get(child, 0) + 1
            strongest[child] = max(strongest.get(child, pair), pair)
        children: dict[int, list[tuple[float, int]]] = {}
        for child, (coefficient, parent) in strongest.items():
            children.setdefault(parent, []).append((-coefficient, child))  # strongest first
        levels, budget = job.info["levels"], [TREE_NODES]
        top = range(int(levels[-1]["start"]), int(levels[-1]["stop"]))
        tree = Tree(job, children, parents, _matches(job), budget)
        roots = "".join(tree.node(f, None) for f in top)
        orphans = [f for f in tree_nodes(job) if f not in strongest and f not in top]
        if orphans:  # finer features that pass the edge threshold under no parent
            below = "".join(tree.node(f, None) for f in orphans)
            roots += f"<li><details><summary>{len(orphans)} without a parent</summary><ul>{below}</ul></details></li>"
        ranks = ", ".join(str(level["rank"]) for level in levels)
        cut = f'<p class="note">… cut at {TREE_NODES} nodes</p>' if budget[0] <= 0 else ""
        parts.append(
            f'<section class="tree" data-method="{escape(job.method)}"><h3>'
            f"{escape(setting_of(job))} · job {escape(job.name)} · ranks {ranks} (finest "
            f'first), {len(job.info["edges"])} edges</h3><ul class="tree">{roots}</ul>'
            f"{cut}</section>"
        )
    return "\n".join(parts) + "</section>"


class Tree(NamedTuple):
    """One job's tree: each child under its strongest parent."""

    job: Job
    children: dict[int, list[tuple[float, int]]]  # parent -> (-coefficient, child), sorted later
    parents: dict[int, int]  # child -> its number of parents
    matches: dict[int, str]  # feature -> its matched concept and AUROC, as text
    budget: list[int]  # nodes left to draw

    def node(self, feature: int, coefficient: float | None) -> str:
        """One node (a <details> when it has children), while the budget lasts."""
        if self.budget[0] <= 0:
            return ""
        self.budget[0] -= 1
        top = [str(c.get("token", "")).strip() for c in contexts_of(self.job, feature)[:1]]
        hint = f' <span class="hint">{escape(top[0])}</span>' if top and top[0] else ""
        hint += f" {escape(self.matches[feature])}" if feature in self.matches else ""
        notes = [f"coefficient {num(coefficient)}"] if coefficient is not None else []
        others = self.parents.get(feature, 0) - 1
        notes += [f"+{others} other parent{'s' * (others > 1)}"] if others > 0 else []
        note = f' <span class="note">{escape(", ".join(notes))}</span>' if notes else ""
        label = f"{feature_link(self.job, feature)}{hint}{note}"
        below = [self.node(child, -c) for c, child in sorted(self.children.get(feature, []))]
        if not any(below):
            return f'<li class="leaf">{label}</li>'
        return f"<li><details><summary>{label}</summary><ul>{''.join(below)}</ul></details></li>"


def _matches(job: Job) -> dict[int, str]:
    """feature -> `food 0.83`: its concept matched through its own (native) encoder."""
    rows = job.rows
    rows = rows[(rows["task"] == "concept_detection") & (rows["metric"] == "auroc")]
    rows = rows[rows["feature"].notna() & rows["encoder"].fillna("native").eq("native")]
    return {
        int(f): f"{c} {num(v)}"
        for f, c, v in zip(rows["feature"], rows["concept"], rows["value"], strict=True)
    }

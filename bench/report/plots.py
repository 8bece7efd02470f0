"""The report's pictures: the steering headline by setting and the steering score vs KL
target (each with its 95% interval), per-feature AUROC by method and SNMF loss curves as PNGs (matplotlib's Agg canvas, no display needed), and hierarchical SNMF
trees as indented markdown lists.

`plot_section` draws them for a whole sweep into its folder from the series `build`
computed (bench.report.series); `plot_job` computes one job's series and draws those that
apply (for a logger to attach to that run). Drawing computes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.storage import atomic_write
from bench.report.common import Job, contexts_of, inline, num
from bench.report.series import PlotSeries, plot_series

log = logging.getLogger(__name__)

TREE_LINES = 150  # longest indented tree written per job
FIGSIZE = (7, 4.5)  # inches; with DPI, a 700 x 450 pixel PNG
DPI = 100  # dots per inch of every PNG


def plot_section(series: PlotSeries, jobs: list[Job], directory: Path) -> str:
    """Draw each plot whose data exists into `directory`; markdown linking them."""
    links = []
    for name, title, draw in _PLOTS:
        skipped = _draw(directory / name, title, draw, series, jobs)
        if skipped:
            log.info("plot %s skipped: %s", name, skipped)
        else:
            links.append(f"![{title}]({name})")
    return "## Plots\n\n" + "\n\n".join(links) if links else ""


def plot_job(frame: pd.DataFrame, out_dir: Path, info: dict | None = None) -> list[Path]:
    """Write the plots that apply to one job's metrics table into `out_dir` (created if
    needed): steering score vs KL target, the AUROC distribution and, when `info` (the
    method's fit report, features.json's "info"; None: no fit report) has a `loss_curve`,
    the SNMF loss curve. Returns the paths written, [] when none applies."""
    out_dir = Path(out_dir)
    method = str(frame["method"].iloc[0]) if len(frame) else "job"
    name = str(frame["run_id"].iloc[0]) if len(frame) and "run_id" in frame else out_dir.name
    jobs = [Job(name, method, frame, info or {}, None)]
    series = plot_series(frame)
    written = []
    for file, title, draw in _PLOTS:
        skipped = _draw(out_dir / file, title, draw, series, jobs)
        if skipped:
            log.debug("plot %s skipped for %s: %s", file, name, skipped)
        else:
            written.append(out_dir / file)
    return written


def _draw(path: Path, title: str, draw: Any, series: PlotSeries, jobs: list[Job]) -> str | None:
    """One plot written atomically to `path`; or why it was skipped (nothing written)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    skipped = draw(ax, series, jobs)
    if skipped:
        return skipped
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return None


def _plot_steering(ax: Any, series: PlotSeries, jobs: list[Job]) -> str | None:
    curves = series.steering_vs_kl
    if curves.empty:
        return "no per-sample steering_score rows"
    for label, curve in curves.groupby("label", sort=True):
        kl = curve["kl_target"].astype(float)
        (line,) = ax.plot(kl, curve["value"], marker="o", label=label)
        ax.fill_between(
            kl,
            curve["ci_low"].astype(float),
            curve["ci_high"].astype(float),
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )
    ax.set(xlabel="KL target (nats)", ylabel="mean steering score (0-2), 95% interval over units")
    ax.legend(fontsize=8)
    return None


def _plot_headline(ax: Any, series: PlotSeries, jobs: list[Job]) -> str | None:
    """The steering headline per setting with its 95% interval, one marker per protocol."""
    rows = series.headline
    if rows.empty:
        return "no steering headline rows"
    labels = list(dict.fromkeys(rows.sort_values("value", kind="stable")["label"]))
    protocols = sorted(rows["protocol"].unique())
    for i, protocol in enumerate(protocols):
        mine = rows[rows["protocol"] == protocol]
        offset = (i - (len(protocols) - 1) / 2) * 0.25
        y = [labels.index(label) + offset for label in mine["label"]]
        low = (mine["value"] - mine["ci_low"]).clip(lower=0)
        high = (mine["ci_high"] - mine["value"]).clip(lower=0)
        ax.errorbar(
            mine["value"],
            y,
            xerr=[low.fillna(0), high.fillna(0)],
            fmt="o",
            capsize=3,
            label=f"{protocol} protocol",
        )
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="held-out steering score (0-2), 95% interval")
    ax.legend(fontsize=8)
    return None


def _plot_auroc(ax: Any, series: PlotSeries, jobs: list[Job]) -> str | None:
    if series.auroc.empty:
        return "no per-feature auroc rows"
    groups = list(series.auroc.groupby("label", sort=True))
    ax.boxplot([part["value"] for _, part in groups], tick_labels=[g for g, _ in groups])
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # chance
    ax.set(ylabel="test AUROC for the feature's concept")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    return None


def _plot_loss(ax: Any, series: PlotSeries, jobs: list[Job]) -> str | None:
    curves = []
    for job in jobs:  # SNMF keeps its fit report in info; hierarchical SNMF one per level
        fits = [job.info] if "loss_curve" in job.info else job.info.get("level_reports") or []
        for level, fit in enumerate(fits):
            if isinstance(fit, dict) and fit.get("loss_curve"):
                suffix = f" level {level} (k={fit.get('rank')})" if len(fits) > 1 else ""
                curves.append((f"{job.method} job {job.name}{suffix}", fit["loss_curve"]))
    if not curves:
        return "no SNMF fit report (loss_curve) in any job's features/features.json"
    for label, losses in curves:
        ax.plot(range(1, len(losses) + 1), [max(v, 1e-30) for v in losses], label=label)
    ax.set(xlabel="iteration", ylabel="loss ||A - Z Y||^2", yscale="log")
    ax.legend(fontsize=8)
    return None


_PLOTS = [  # file name, title, drawer (returns why it skipped, or None when it drew)
    ("steering_headline.png", "Steering headline by setting", _plot_headline),
    ("steering_vs_kl.png", "Steering score vs KL target", _plot_steering),
    ("auroc_by_method.png", "Concept-detection AUROC per feature", _plot_auroc),
    ("snmf_loss.png", "SNMF loss curves", _plot_loss),
]


def tree_section(jobs: list[Job]) -> str:
    """Each hierarchical SNMF job's tree: coarsest features as roots, children indented."""
    hier = [j for j in jobs if "levels" in j.info and "edges" in j.info]
    if not hier:
        log.info("SNMF tree skipped: no hierarchical SNMF job")
        return ""
    parts = ["## Hierarchical SNMF trees"]
    for job in hier:
        children: dict[int, list[tuple[float, int]]] = {}
        for edge in job.info["edges"]:
            pair = (float(edge["coefficient"]), int(edge["child"]))
            children.setdefault(int(edge["parent"]), []).append(pair)
        top = job.info["levels"][-1]
        stack = [(None, root, 0) for root in reversed(range(int(top["start"]), int(top["stop"])))]
        lines: list[str] = []
        while stack and len(lines) <= TREE_LINES:
            coefficient, node, depth = stack.pop()
            weight = "" if coefficient is None else f" (coefficient {num(coefficient)})"
            token = [str(c.get("token", "")).strip() for c in contexts_of(job, node)[:1]]
            hint = f" `{inline(token[0])}`" if token and token[0] else ""
            lines.append(f"{'  ' * depth}- feature {node}{hint}{weight}")
            stack += [(c, child, depth + 1) for c, child in sorted(children.get(node, []))]
        more = "\n- … (cut)" if len(lines) > TREE_LINES else ""
        ranks = [level["rank"] for level in job.info["levels"]]
        picture = f"{job.name}/features/tree.png"
        parts.append(
            f"### {job.method} · job `{job.name}` · ranks {ranks} (finest first)\n\n"
            f"Drawn: [{picture}]({picture})\n\n" + "\n".join(lines[:TREE_LINES]) + more
        )
    return "\n\n".join(parts)

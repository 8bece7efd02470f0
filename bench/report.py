"""`featbench-report DIR`: a sweep's results merged into one table, a report, plots and
per-feature pages.

    featbench-report results/multirun/2026-01-01_00-00-00
    featbench-report DIR --compare paper     # beside the SNMF paper's numbers

Every input is read first; then each output is written atomically into DIR:

- `summary.parquet`: every row of every `metrics.parquet` under DIR with all columns
  (the union of the jobs' extra columns), plus `job_dir`, the job folder relative to DIR;
- `report.md`: per (model, layer, hook), one table per task with a row per method and
  the task's headline summary metrics (rows with no feature and no concept); a cell
  with several runs shows their mean and n;
- `steering_vs_kl.png`, `auroc_by_method.png`, `snmf_loss.png`, each skipped with one
  log line when its data is absent; hierarchical SNMF trees as indented lists;
- `features.md`: per job, its top features with their description, top-activating
  contexts (the job's `features/contexts.json`) and steered samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa

from bench.errors import FeatbenchError
from bench.hooks import HOOKS
from bench.results import METRICS_FILE, read_metrics, write_metrics
from bench.storage import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

HEADLINES = {  # task -> (title, headline summary metrics); other tasks show every summary metric
    "concept_detection": ("Concept detection", ["mean_feature_auroc", "concept_coverage", "frac_s_cd_positive"]),
    "steering": ("Steering", ["steering_score", "heldout_steering_score", "concept_score", "fluency_score"]),
    "reconstruction": ("Reconstruction", ["fvu", "kl_spliced", "ce_delta"]),
    "synthetic_recovery": ("Synthetic recovery (lowest noise of each generator)", ["mcc", "recovered_fraction"]),
}  # fmt: skip
MISSING = "—"
PAPER_REFERENCE = Path(__file__).resolve().parents[1] / "results" / "paper_reference.csv"
REFERENCE_COLUMNS = ["model", "layer", "method", "metric", "value", "source", "confidence"]
PAPER_JUDGE = "gpt-4o-mini"
PAPER_SETTING = ("hook", "rank", "sparsity", "init")  # optional reference columns, shown if set
TREE_LINES = 150  # longest indented tree written per job
Labels = Callable[[pd.DataFrame], pd.Series]  # rows -> the plot's series label of each row


class ReportError(FeatbenchError):
    """The report cannot be built from this input; nothing was written."""


class Job(NamedTuple):
    """One job folder: its rows and its features' side files."""

    name: str  # the folder, relative to DIR
    method: str
    rows: pd.DataFrame
    info: dict  # features/features.json "info": the method's fit report
    contexts: list | None  # features/contexts.json: per feature, its top contexts


def report(directory: Path, compare: str | None = None, top: int = 5) -> Path:
    """Build every output of `featbench-report` in `directory`; returns report.md's path."""
    directory = Path(directory)
    reference = read_reference(compare) if compare else None
    summary = collect(directory)
    jobs = load_jobs(summary, directory)
    supervised = _supervised_methods(summary)
    cells = headline_cells(summary)
    sections = [
        _intro(summary, directory, supervised),
        headline_tables(summary, cells, supervised),
        compare_section(cells, reference) if reference is not None else "",
        plot_section(summary, jobs, directory, supervised),
        tree_section(jobs),
    ]
    meta = {"report_of": sorted(summary["job_dir"].unique())}
    write_metrics(summary, directory / "summary.parquet", meta)
    atomic_write_text(directory / "features.md", features_page(jobs, top))
    path = atomic_write_text(directory / "report.md", "\n\n".join(filter(None, sections)) + "\n")
    log.info("wrote %s, features.md and summary.parquet (%d rows)", path, len(summary))
    return path


# --- input ---------------------------------------------------------------------------------


def collect(directory: Path) -> pd.DataFrame:
    """Every metrics.parquet under `directory` in one table, with a `job_dir` column."""
    if not directory.is_dir():
        raise ReportError(f"{directory}: {'not a' if directory.exists() else 'no such'} directory")
    paths = sorted(directory.rglob(METRICS_FILE), key=_natural)
    if not paths:
        raise ReportError(f"{directory}: no {METRICS_FILE} under it; run featbench into it first")
    frames = []
    for path in paths:
        try:
            frame, _ = read_metrics(path)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ReportError(f"{path}: unreadable metrics file ({_one_line(err)})") from None
        frame["job_dir"] = path.parent.relative_to(directory).as_posix()
        frames.append(frame)
    summary = pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)
    log.info("%s: %d jobs, %d rows", directory, len(paths), len(summary))
    return _arrow_safe(summary)


def load_jobs(summary: pd.DataFrame, directory: Path) -> list[Job]:
    jobs = []
    for name, rows in summary.groupby("job_dir", sort=False):
        side = directory / str(name) / "features"
        meta, contexts = _read_json(side / "features.json"), _read_json(side / "contexts.json")
        info = meta.get("info") if isinstance(meta, dict) else None
        info = info if isinstance(info, dict) else {}
        contexts = contexts if isinstance(contexts, list) else None
        jobs.append(Job(str(name), str(rows["method"].iloc[0]), rows, info, contexts))
    return jobs


def read_reference(compare: str) -> pd.DataFrame:
    """The paper's numbers: `paper` is results/paper_reference.csv, else a CSV path."""
    path = PAPER_REFERENCE if compare == "paper" else Path(compare)
    if not path.is_file():
        columns = ", ".join(REFERENCE_COLUMNS)
        raise ReportError(f"--compare {compare}: {path} does not exist (a CSV of {columns})")
    try:
        reference = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: unreadable CSV ({_one_line(err)})") from None
    missing = [c for c in REFERENCE_COLUMNS if c not in reference]
    if missing:
        raise ReportError(f"{path}: lacks columns {missing}; expected {REFERENCE_COLUMNS}")
    return reference


# --- headline tables -----------------------------------------------------------------------


def headline_cells(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, task, method, column): one run gives `value [ci_low, ci_high]`,
    several give `mean (n=k)` over the defined values, none gives —."""
    rows = summary[summary["feature"].isna() & summary["concept"].isna()].copy()
    pairs = zip(rows["task"], rows["metric"], strict=True)
    rows = rows[pd.Series([m in _headlines(t, m) for t, m in pairs], index=rows.index, dtype=bool)]
    rows["setting"] = _settings(rows)
    rows["_gen"] = rows["generator"].astype("string") if "generator" in rows else pd.NA
    rows["_noise"] = pd.to_numeric(rows.get("noise", pd.Series(dtype=float)), errors="coerce")
    lowest = rows.groupby(["setting", "task", "_gen"], dropna=False)["_noise"].transform("min")
    rows = rows[rows["_noise"].isna() | rows["_noise"].eq(lowest)]
    out = []
    keys = ["setting", "model", "layer", "hook", "task", "method", "_gen", "metric"]
    for (setting, model, layer, hook, task, method, gen, metric), cell in rows.groupby(
        keys, dropna=False, sort=False
    ):
        values = cell["value"].dropna().astype(float)
        text = f"{_num(values.mean())} (n={len(values)})" if len(values) > 1 else MISSING
        if len(values) == 1:  # the run's own 95% interval, when the task gives one
            run = cell[cell["value"].notna()].iloc[0]
            low, high = run.get("ci_low"), run.get("ci_high")
            interval = pd.notna(low) and pd.notna(high)
            text = _num(values.iloc[0]) + (f" [{_num(low)}, {_num(high)}]" if interval else "")
        noise = cell["_noise"].iloc[0]
        label = metric if pd.isna(gen) else f"{metric} ({gen}, noise {noise:g})"
        order = f"{'' if pd.isna(gen) else gen}:{_headlines(task, metric).index(metric):03d}"
        judges = sorted(set(cell["judge"].dropna().astype(str))) if "judge" in cell else []
        out.append({"setting": setting, "model": model, "layer": layer, "hook": hook, "task": task,
                    "method": method, "metric": metric, "label": label, "order": order,
                    "text": text, "value": values.mean() if len(values) else None,
                    "judge": ", ".join(judges)})  # fmt: skip
    columns = ["setting", "model", "layer", "hook", "task", "method", "metric", "label", "order"]
    return pd.DataFrame(out, columns=[*columns, "text", "value", "judge"])


def headline_tables(summary: pd.DataFrame, cells: pd.DataFrame, supervised: set[str]) -> str:
    parts = []
    for setting, group in summary.groupby(_settings(summary), sort=False):
        mine = cells[cells["setting"] == setting]
        methods = sorted(group["method"].dropna().unique())
        parts.append(f"## {setting}")
        known = [t for t in HEADLINES if t in set(mine["task"])]
        for task in known + sorted(set(mine["task"]) - set(known)):
            part = mine[mine["task"] == task].sort_values("order")
            columns = list(dict.fromkeys(part["label"]))
            header = ["method", *columns] + (["judge"] if task == "steering" else [])
            body = []
            for method in methods:
                ours = part[part["method"] == method]
                texts = ours.set_index("label")["text"]
                row = [
                    f"{method}{' †' * (method in supervised)}",
                    *(texts.get(c, MISSING) for c in columns),
                ]
                judge = ", ".join(ours["judge"].unique()) or MISSING
                body.append(row + ([judge] if task == "steering" else []))
            parts.append(f"### {HEADLINES.get(task, (task,))[0]}\n\n{_table(header, body)}")
    return "\n\n".join(parts)


def compare_section(cells: pd.DataFrame, reference: pd.DataFrame) -> str:
    """Our headline numbers beside the paper's for the same (method, metric)."""
    ref = reference.rename(columns={c: f"paper_{c}" for c in reference.columns if c != "metric"})
    ref = ref.assign(
        _method=ref["paper_method"].map(_norm), metric=ref["metric"].astype(str).str.strip()
    )
    ours = cells.assign(_method=cells["method"].map(_norm))
    merged = ours.merge(ref, on=["_method", "metric"])
    matched = ref.merge(ours[["_method", "metric"]].drop_duplicates(), on=["_method", "metric"])
    head = (
        "## Comparison with the paper\n\nThe paper's values for the same method and metric; "
        "`differs` names what is not the same setting (model, layer, hook and, for steering, "
        f"the judge: the paper's is {PAPER_JUDGE})."
    )
    if merged.empty:
        return f"{head}\n\nNo (method, metric) here is in the reference ({len(ref)} rows)."
    body = []
    for r in merged.to_dict("records"):
        std = r.get("paper_std")
        value = _num(r["paper_value"]) + (f" ± {_num(std)}" if pd.notna(std) else "")
        setting = [r["paper_model"], f"layer {_plain(r['paper_layer'])}"]
        setting += [
            f"{k} {_plain(r[f'paper_{k}'])}" for k in PAPER_SETTING if pd.notna(r.get(f"paper_{k}"))
        ]
        body.append([r["setting"], r["method"], r["label"], r["text"], value, ", ".join(setting),
                     str(r["paper_source"]), str(r["paper_confidence"]), _differences(r)])  # fmt: skip
    header = ["ours: setting", "method", "metric", "ours", "paper", "paper: setting", "source"]
    table = _table([*header, "confidence", "differs"], body)
    return f"{head}\n\n{table}\n\n{len(ref) - len(matched)} reference rows match no result here."


def _differences(row: dict) -> str:
    notes = []
    model, paper_model = str(row["model"]), str(row["paper_model"])
    if _norm(model.rsplit("/", 1)[-1]) != _norm(paper_model.rsplit("/", 1)[-1]):
        notes.append(f"model: ours {model}, paper {paper_model}")
    layer, paper_layer = _plain(row["layer"]), _plain(row["paper_layer"])
    if pd.notna(row["paper_layer"]) and layer != paper_layer:
        notes.append(f"layer: ours {layer}, paper {paper_layer}")
    short = next((k for k, v in HOOKS.items() if v.format(layer=layer) == row["hook"]), row["hook"])
    if pd.notna(row.get("paper_hook")) and str(row["paper_hook"]) not in (short, row["hook"]):
        notes.append(f"hook: ours {short}, paper {row['paper_hook']}")
    if row["task"] == "steering" and row["judge"] != PAPER_JUDGE:
        notes.append(f"judge: ours {row['judge'] or 'unknown'}, paper {PAPER_JUDGE}")
    return "; ".join(notes) or "same setting"


# --- plots ---------------------------------------------------------------------------------


def plot_section(
    summary: pd.DataFrame, jobs: list[Job], directory: Path, supervised: set[str]
) -> str:
    """Draw each plot whose data exists (Agg canvas) into `directory`; markdown linking them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    several = _settings(summary).nunique() > 1
    labels = partial(_series_labels, several=several, supervised=supervised)
    plots = [
        ("steering_vs_kl.png", "Steering score vs KL target", _plot_steering),
        ("auroc_by_method.png", "Concept-detection AUROC per feature", _plot_auroc),
        ("snmf_loss.png", "SNMF loss curves", _plot_loss),
    ]
    links = []
    for name, title, draw in plots:
        fig = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        skipped = draw(ax, summary, jobs, labels)
        if skipped:
            log.info("plot %s skipped: %s", name, skipped)
            continue
        ax.set_title(title)
        save = fig.savefig
        atomic_write(directory / name, lambda tmp, save=save: save(tmp, format="png"))
        links.append(f"![{title}]({name})")
    return "## Plots\n\n" + "\n\n".join(links) if links else ""


def _plot_steering(ax: Any, summary: pd.DataFrame, jobs: list[Job], labels: Labels) -> str | None:
    rows = summary[(summary["task"] == "steering") & (summary["metric"] == "steering_score")]
    rows = rows[rows["feature"].notna() & rows["value"].notna() & rows["kl_target"].notna()]
    rows = rows[rows["sample"].notna()] if "sample" in rows else rows.iloc[:0]
    if rows.empty:
        return "no per-sample steering_score rows"
    for label, part in rows.groupby(labels(rows)):
        means = part.groupby("kl_target")["value"].mean()  # features, signs and samples pooled
        ax.plot(means.index.astype(float), means.astype(float), marker="o", label=label)
    ax.set(xlabel="KL target (nats)", ylabel="mean steering score (0-2), both signs")
    ax.legend(fontsize=8)
    return None


def _plot_auroc(ax: Any, summary: pd.DataFrame, jobs: list[Job], labels: Labels) -> str | None:
    rows = summary[(summary["task"] == "concept_detection") & (summary["metric"] == "auroc")]
    rows = rows[rows["feature"].notna() & rows["value"].notna()]
    if rows.empty:
        return "no per-feature auroc rows"
    groups = list(rows.groupby(labels(rows)))
    ax.boxplot(
        [part["value"].astype(float) for _, part in groups], tick_labels=[g for g, _ in groups]
    )
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # chance
    ax.set(ylabel="test AUROC for the feature's concept")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    return None


def _plot_loss(ax: Any, summary: pd.DataFrame, jobs: list[Job], labels: Labels) -> str | None:
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
            weight = "" if coefficient is None else f" (coefficient {_num(coefficient)})"
            token = [str(c.get("token", "")).strip() for c in _contexts(job, node)[:1]]
            hint = f" `{_inline(token[0])}`" if token and token[0] else ""
            lines.append(f"{'  ' * depth}- feature {node}{hint}{weight}")
            stack += [(c, child, depth + 1) for c, child in sorted(children.get(node, []))]
        more = "\n- … (cut)" if len(lines) > TREE_LINES else ""
        ranks = [level["rank"] for level in job.info["levels"]]
        picture = f"{job.name}/features/tree.png"
        parts.append(f"### {job.method} · job `{job.name}` · ranks {ranks} (finest first)\n\n"
                     f"Drawn: [{picture}]({picture})\n\n" + "\n".join(lines[:TREE_LINES]) + more)  # fmt: skip
    return "\n\n".join(parts)


# --- per-feature pages ---------------------------------------------------------------------


def features_page(jobs: list[Job], top: int) -> str:
    lines = ["# featbench: features", "",
             f"Per job, up to {top} features: the steered ones first (by `best_steering_score`), "
             "then by concept-detection AUROC. Contexts mark the top token as [[token]].", ""]  # fmt: skip
    for job in jobs:
        first = job.rows.iloc[0]
        setting = _settings(job.rows).iloc[0]
        lines += [f"## {job.method} · job `{job.name}` · {setting} · seed {first['seed']}", ""]
        ranked = _ranked_features(job.rows)[:top]
        if not ranked:
            lines += ["No per-feature rows (neither steering nor concept detection ran).", ""]
        for feature in ranked:
            lines += _feature_block(job, feature)
    return "\n".join(lines)


def _ranked_features(rows: pd.DataFrame) -> list[int]:
    rows = rows[rows["feature"].notna()]
    best = rows[rows["metric"] == "best_steering_score"]
    auroc = rows[(rows["task"] == "concept_detection") & (rows["metric"] == "auroc")]
    parts = [p.sort_values("value", ascending=False, na_position="last") for p in (best, auroc)]
    return list(dict.fromkeys(int(f) for part in parts for f in part["feature"]))


def _feature_block(job: Job, feature: int) -> list[str]:
    rows = job.rows[job.rows["feature"] == feature]
    facts = []
    for _, best in rows[rows["metric"] == "best_steering_score"].head(1).iterrows():
        where = (
            f" (KL {best['kl_target']:g}, {_sign(best['sign'])})" if pd.notna(best["sign"]) else ""
        )
        facts.append(f"best steering {_num(best['value'])}{where}")
    auroc = rows[(rows["task"] == "concept_detection") & (rows["metric"] == "auroc")]
    for _, auc in auroc.head(1).iterrows():
        facts.append(f"AUROC {_num(auc['value'])} for `{auc['concept']}`")
    out = [f"### feature {feature}" + "".join(f" · {fact}" for fact in facts), ""]
    steering = rows[rows["task"] == "steering"]
    if "description_text" in steering and steering["description_text"].notna().any():
        described = steering.dropna(subset=["description_text"]).drop_duplicates("description_text")
        signed = len(described) > 1  # output-centric descriptions differ by sign
        texts = [(f"{_sign(r['sign'])}: " if signed else "") + _inline(r["description_text"])
                 for _, r in described.iterrows()]  # fmt: skip
        out += [f"Description: {'; '.join(texts)}", ""]
    contexts = _contexts(job, feature)
    if contexts:
        out += ["Top-activating contexts:", ""]
        for c in contexts:
            token = _inline(c.get("token", "")).strip() or " "
            out.append(f"- {_num(c.get('score'))} `{token}`: {_inline(c.get('context'))}")
        out.append("")
    samples = _samples(steering)[:3]
    if samples:
        out += ["Steered samples (best first):", ""]
        for scores, kl, sign, text in samples:
            judged = ", ".join(f"{k.removesuffix('_score')} {_num(v)}" for k, v in scores.items())
            out.append(f"- KL {kl:g}, {_sign(sign)} · {judged}: “{_inline(text)}”")
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


# --- small helpers -------------------------------------------------------------------------


def _intro(summary: pd.DataFrame, directory: Path, supervised: set[str]) -> str:
    text = (
        f"# featbench report\n\n`{directory}`: {summary['job_dir'].nunique()} jobs, "
        f"{len(summary)} result rows, all in [summary.parquet](summary.parquet). "
        "Per-feature pages: [features.md](features.md).\n\n"
        "Cells are a task's summary rows (no feature, no concept): `v [lo, hi]` is a value "
        "with its 95% bootstrap interval, `m (n=k)` the mean over k runs (seeds) of one "
        f"setting, {MISSING} a missing value (its `reason` is in summary.parquet)."
    )
    if supervised:
        text += (
            f"\n\n† supervised ({', '.join(sorted(supervised))}): DiffMean is fitted with the "
            "concept labels on the same train split, so its numbers are an upper reference "
            "for the unsupervised methods, not a competitor."
        )
    return text


def _headlines(task: str, metric: str) -> list[str]:
    return HEADLINES[task][1] if task in HEADLINES else [metric]


def _supervised_methods(summary: pd.DataFrame) -> set[str]:
    if "supervised" not in summary:
        return set()
    return set(summary.loc[summary["supervised"].eq(True), "method"].dropna().astype(str))


def _settings(rows: pd.DataFrame) -> pd.Series:
    """Each row's (model, layer, hook) as text."""
    layer = rows["layer"].astype("string").fillna(MISSING)
    return rows["model"].astype(str) + " · layer " + layer + " · `" + rows["hook"].astype(str) + "`"


def _series_labels(rows: pd.DataFrame, several: bool, supervised: set[str]) -> pd.Series:
    labels = rows["method"].map(lambda m: f"{m} (supervised)" if m in supervised else str(m))
    return labels + " · " + _settings(rows).str.replace("`", "") if several else labels


def _plain(value: Any) -> str:
    """A reference or run value as text: 23.0 -> 23, 0.01 -> 0.01, missing -> —."""
    if value is None or pd.isna(value):
        return MISSING
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *body]
    return "\n".join(
        "| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines
    )


def _num(value: Any) -> str:
    """Two decimals (two significant digits below 0.01); — when missing."""
    if value is None or pd.isna(value):
        return MISSING
    value = float(value)
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def _sign(sign: Any) -> str:
    return f"sign {int(sign):+d}"


def _inline(text: Any) -> str:
    """Text on one markdown line: newlines shown as ⏎, no raw HTML."""
    return str(text or "").replace("\r", "").replace("\n", " ⏎ ").replace("<", "&lt;")


def _contexts(job: Job, feature: int) -> list[dict]:
    found = job.contexts[feature] if job.contexts and 0 <= feature < len(job.contexts) else []
    return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []


def _norm(name: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_json(path: Path) -> Any:
    """A job's JSON side file, or None (with a log line when it exists but is unreadable)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable, left out (%s)", path, _one_line(err))
        return None


def _arrow_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns whose values mix types across jobs (a plugin's extras) become text."""
    for column in [c for c in frame.columns if frame[c].dtype == object]:
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frame[column] = frame[column].astype("string")
    return frame


def cli(argv: list[str] | None = None) -> None:
    """Console-script entry point: `featbench-report DIR [--compare paper] [--top N]`."""
    parser = argparse.ArgumentParser(prog="featbench-report", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="a job or sweep folder (searched recursively)")
    parser.add_argument("--compare", metavar="paper|CSV", help="add the paper's reference numbers")
    parser.add_argument("--top", type=int, default=5, help="features per job in features.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = report(args.directory, args.compare, max(args.top, 1))
    except FeatbenchError as err:
        sys.stderr.write(f"featbench-report: {_one_line(err)}\n")
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    from bench.report import cli as _cli  # the logger is then named bench.report

    _cli()

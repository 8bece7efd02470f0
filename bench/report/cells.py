"""Settings and cells: the report's one grouping step.

A **setting** is a job's config without its seed and output paths (`setting_hash` on every
row; `meta["setting"]` in the job's metrics.parquet holds its keys). `assign_settings` names
each setting by its method plus the keys that vary between the settings of one table
(model, layer, hook): `method.*` keys among the settings of the same method, the other keys
among all of the table's settings, e.g. `snmf rank=50 init=kmeans`.

A **cell** is one (model, layer, hook, setting_hash) and one headline metric (+ its `encoder`,
`description`, `generator` and `noise` where the task has them). Only seeds are averaged:
a cell's value is the mean of its seeds' values, and its interval the percentile interval of
the element-wise mean of the seeds' bootstrap replicates when every seed has them.
`headline_cells` builds them once; differences and every table render from them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd

from bench.core.storage import sha256_json
from bench.errors import error_line
from bench.report.common import MISSING, num, place, supervised_methods
from bench.results import LEGACY_SEED, SUMMARY_DIMENSIONS
from bench.stats import Estimate, percentile_interval

log = logging.getLogger(__name__)

# summary-row dimensions a cell keeps (protocol: steering's concept | feature | paper)
DIMS = SUMMARY_DIMENSIONS
DEFAULT_PROTOCOL = "concept"  # the comparison's steering protocol: its columns are unlabelled
BLOCK = ["model", "layer", "hook"]  # one table per block
# how a steering cell was judged and what was steered (issue 17: the paper's protocol labels
# its judge, its policy for failed judgements, and the DiffMean arm's generated direction)
JUDGED_BY = ("judge_label", "judge_failure_policy", "direction")
CELL_COLUMNS = [
    "place", *BLOCK, "setting_hash", "setting", "method", "task", "title", "task_order",
    "compared", "higher_is_better", "metric", *DIMS, "label", "order", "value", "ci_low", "ci_high", "n", "seeds", "defined", "paired_over",
    "units_hash", "replicates", "dataset_hash", "code_version", "code_identity", "judge", *JUDGED_BY, "supervised",
    "text",
]  # fmt: skip


def assign_settings(
    summary: pd.DataFrame, metas: dict[str, dict]
) -> tuple[pd.DataFrame, dict[str, dict | None]]:
    """`summary` with `setting_hash` filled (jobs from older code: their config_hash, with a
    warning) and a `setting` label per row; and setting_hash -> its keys (None: unknown).
    `metas`: job_dir -> that job's metrics.parquet meta."""
    summary = summary.copy()
    if "setting_hash" not in summary:
        summary["setting_hash"] = pd.Series(pd.NA, index=summary.index, dtype="string")
    old = summary["setting_hash"].isna()
    if old.any():
        jobs = sorted(summary.loc[old, "job_dir"].astype(str).unique())
        log.warning(
            "%d job(s) written by older code have no setting_hash (%s): each is its own "
            "setting (its config_hash), so their seeds are not averaged",
            len(jobs),
            ", ".join(jobs[:5]) + (" …" if len(jobs) > 5 else ""),
        )
        fallback = "config:" + summary.loc[old, "config_hash"].astype(str)
        summary["setting_hash"] = summary["setting_hash"].astype("string")
        summary.loc[old, "setting_hash"] = fallback
    for job_dir, meta in metas.items():  # older code wrote the run's seed as a placeholder
        setting = (meta or {}).get("setting")
        if setting and LEGACY_SEED in setting.values():
            kept = {k: v for k, v in setting.items() if v != LEGACY_SEED}
            meta["setting"] = kept  # as setting_of writes it now: the same setting, one hash
            summary.loc[summary["job_dir"].astype(str) == str(job_dir), "setting_hash"] = (
                sha256_json(kept)[:16]
            )
    jobs = summary.drop_duplicates("job_dir")
    entries = {}  # setting_hash -> (block, method, setting keys or None)
    for job in jobs.to_dict("records"):
        setting = (metas.get(str(job["job_dir"])) or {}).get("setting")
        block = (job["model"], _key(job["layer"]), job["hook"])
        entries.setdefault(job["setting_hash"], (block, str(job["method"]), setting))
    labels = setting_labels(entries)
    summary["setting"] = summary["setting_hash"].map(labels).astype("string")
    return summary, {h: entry[2] for h, entry in entries.items()}


def setting_labels(entries: dict[str, tuple[Any, str, dict | None]]) -> dict[str, str]:
    """setting_hash -> label, from (block, method, setting keys or None) per setting hash."""
    labels = {}
    blocks: dict[Any, list[str]] = {}
    for hash_, (block, _, _) in entries.items():
        blocks.setdefault(block, []).append(hash_)
    for hashes in blocks.values():
        others = _varying([entries[h][2] for h in hashes], method=False)
        for hash_ in hashes:
            _, method, setting = entries[hash_]
            same = [h for h in hashes if entries[h][1] == method]
            keys = _varying([entries[h][2] for h in same], method=True) + others
            words = [method]
            if setting is None and len(same) > 1:  # older code: no keys to name it by
                words.append(f"config={hash_.removeprefix('config:')[:8]}")
            words += [
                f"{k.removeprefix('method.')}={_text(setting.get(k))}"
                for k in keys
                if setting is not None
            ]
            labels[hash_] = " ".join(words)
        taken: dict[str, int] = {}
        for hash_ in hashes:
            taken[labels[hash_]] = taken.get(labels[hash_], 0) + 1
        for hash_ in hashes:  # still ambiguous (keys hidden by redaction, ...): add the hash
            if taken[labels[hash_]] > 1:
                labels[hash_] += f" #{hash_.removeprefix('config:')[:6]}"
    return labels


def declarations(
    metas: dict[str, dict], settings: dict[str, dict | None] | None = None
) -> tuple[dict, list[tuple[str, str]]]:
    """task name -> its declaration (`bench.tasks.base.Task.declaration`), as the jobs
    recorded them in their metadata; and what was left out, as (item, why). Only when some
    job comes from code that recorded none: the declaration of each task class its setting
    names (`task.<key>._target_`), when it still imports; a class that does not is left
    out with a warning, and the report shows every summary metric of that task."""
    found: dict[str, dict] = {}
    for meta in metas.values():
        for task, declared in ((meta or {}).get("tasks") or {}).items():
            found.setdefault(str(task), declared)
    left_out: list[tuple[str, str]] = []
    if all("tasks" in (meta or {}) for meta in metas.values()):
        return found, left_out
    targets = {
        str(target)
        for setting in (settings or {}).values()
        for key, target in (setting or {}).items()
        if key.startswith("task.") and key.endswith("._target_") and target
    }
    for target in sorted(targets):
        declared, why = _declared_by(target)
        if declared is None:
            log.warning(
                "task %s: no declaration (%s); its table shows every summary metric", target, why
            )
            left_out.append(
                (f"task {target}", f"no declaration ({why}); every summary metric of it is shown")
            )
            continue
        found.setdefault(declared.pop("name"), declared)
    return found, left_out


def _declared_by(target: str) -> tuple[dict | None, str | None]:
    """The declaration of the task class `target` names, or None and why it has none."""
    from hydra.utils import get_class

    try:
        cls = get_class(target)
        declared = cls.declaration()
    except Exception as err:  # older or foreign code: said and listed, never silent
        return None, error_line(err)
    return {**declared, "name": cls.name or cls.__name__.lower()}, None


def headline_cells(
    summary: pd.DataFrame,
    replicates: dict[str, dict[str, np.ndarray]] | None = None,
    tasks: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """One row per cell (columns CELL_COLUMNS; `replicates` holds each cell's array or None).

    `summary`: rows with `setting_hash` and `setting` (see `assign_settings`);
    `replicates`: job_dir -> replicates_id -> array (bench.results.read_replicates);
    `tasks`: task name -> its declaration (`declarations`): which summary metrics are
    tabulated, in what order, with what title; a task without one shows all of its."""
    replicates, tasks = replicates or {}, tasks or {}
    rows = summary[summary["feature"].isna() & summary["concept"].isna()].copy()
    keep = [
        _headline(tasks, t, m) is not None
        for t, m in zip(rows["task"], rows["metric"], strict=True)
    ]
    rows = rows[pd.Series(keep, index=rows.index, dtype=bool)]
    for dim in DIMS:
        if dim not in rows:
            rows[dim] = pd.NA
    noise = pd.to_numeric(rows["noise"], errors="coerce")
    lowest = noise.groupby(
        [rows["setting_hash"], rows["task"], rows["generator"]], dropna=False
    ).transform("min")
    rows = rows[noise.isna() | noise.eq(lowest)]
    keys = ["setting_hash", "task", "metric", *DIMS]
    out = [
        _cell(cell, replicates, tasks) for _, cell in rows.groupby(keys, dropna=False, sort=False)
    ]
    cells = pd.DataFrame(out, columns=CELL_COLUMNS)
    cells["supervised"] = cells["method"].isin(supervised_methods(summary))
    return _label_kinds(cells)


def _label_kinds(cells: pd.DataFrame) -> pd.DataFrame:
    """A steering protocol judged against several description kinds in one table (two
    steering tasks in a job, as experiment=output_centric runs) gets a column per kind: the
    kind joins the label, so no cell hides another of the same setting."""
    steering = cells[cells["task"] == "steering"]
    for _, part in steering.groupby([*BLOCK, "protocol"], dropna=False, sort=False):
        if part["description"].dropna().nunique() > 1:
            kinds = part["description"].astype(str)
            cells.loc[part.index, "label"] = part["label"] + " (" + kinds + " descriptions)"
            cells.loc[part.index, "order"] = part["order"] + ":" + kinds
    return cells


def estimate(cell: dict) -> Estimate:
    """A cell as a bench.stats Estimate (for differences)."""
    value = None if pd.isna(cell["value"]) else float(cell["value"])
    n = 0 if pd.isna(cell["n"]) else int(cell["n"])
    return Estimate(
        value,
        None if pd.isna(cell["ci_low"]) else float(cell["ci_low"]),
        None if pd.isna(cell["ci_high"]) else float(cell["ci_high"]),
        n,
        None if pd.isna(cell["paired_over"]) else str(cell["paired_over"]),
        None if pd.isna(cell["units_hash"]) else str(cell["units_hash"]),
        cell["replicates"],
    )


def cell_text(value: Any, low: Any, high: Any, n: Any, seeds: int, defined: int) -> str:
    """`value [ci_low, ci_high] n=N`, plus `k seeds` (or `j of k seeds defined`)."""
    if value is None or pd.isna(value):
        return MISSING
    text = num(value)
    if pd.notna(low) and pd.notna(high):
        text += f" [{num(low)}, {num(high)}]"
    if pd.notna(n):
        text += f" n={int(n)}"
    if seeds > 1:
        text += f" · {seeds} seeds" if defined == seeds else f" · {defined} of {seeds} seeds"
    return text


def _cell(cell: pd.DataFrame, replicates: dict[str, dict[str, np.ndarray]], tasks: dict) -> dict:
    first = cell.iloc[0]
    defined = cell[cell["value"].notna()]
    reps = [_replicates(row, replicates) for row in cell.to_dict("records")]
    value = low = high = mean_reps = None
    if len(defined) == 1 and len(cell) == 1:  # one seed: its own interval
        value, low, high = float(first["value"]), first.get("ci_low"), first.get("ci_high")
        mean_reps = reps[0]
    elif len(defined):
        value = float(defined["value"].astype(float).mean())
        sizes = {None if r is None else len(r) for r in reps}
        if len(defined) == len(cell) and None not in sizes and len(sizes) == 1:
            mean_reps = np.mean(np.stack(reps), axis=0)
            low, high = percentile_interval(mean_reps)
    counts = pd.to_numeric(cell["n"], errors="coerce").dropna() if "n" in cell else pd.Series()
    hashes = set(cell["units_hash"]) if "units_hash" in cell else {None}
    units_hash = hashes.pop() if len(hashes) == 1 else None
    task, metric = str(first["task"]), str(first["metric"])
    gen, noise, encoder = first["generator"], first["noise"], first["encoder"]
    protocol = first["protocol"]
    label = metric if pd.isna(encoder) else f"{metric} ({encoder})"
    if pd.notna(protocol) and protocol != DEFAULT_PROTOCOL:
        label = f"{label} ({protocol} protocol)"
    label = label if pd.isna(gen) else f"{label} ({gen}, noise {float(noise):g})"
    index, higher = _headline(tasks, task, metric)
    declared = tasks.get(task, {})
    n = int(counts.min()) if len(counts) else None
    return {
        "place": place(cell).iloc[0],
        **{k: first[k] for k in BLOCK},
        "setting_hash": first["setting_hash"],
        "setting": first["setting"],
        "method": first["method"],
        "task": task,
        "title": declared.get("title", task),
        "task_order": int(declared.get("report_order", 100)),
        "compared": bool(declared.get("compared", True)),
        "higher_is_better": higher,
        "metric": metric,
        **{d: first[d] for d in DIMS},
        "label": label,
        "order": f"{'' if pd.isna(gen) else gen}:{_protocol_rank(protocol)}:{index:03d}:"
        f"{'' if pd.isna(encoder) else encoder}",
        "value": value,
        "ci_low": _float(low),
        "ci_high": _float(high),
        "n": n,
        "seeds": len(cell),
        "defined": len(defined),
        "paired_over": _first(cell, "paired_over"),
        "units_hash": _none(units_hash),
        "replicates": mean_reps,
        "dataset_hash": _first(cell, "dataset_hash"),
        "code_version": ", ".join(_versions(cell)),
        "code_identity": "; ".join(_identities(cell)),
        "judge": ", ".join(_distinct(cell, "judge")),
        **{c: ", ".join(_distinct(cell, c)) for c in JUDGED_BY},
        "supervised": False,  # set per method by headline_cells
        "text": cell_text(value, low, high, n, len(cell), len(defined)),
    }


def _protocol_rank(protocol: Any) -> str:
    """The default protocol's columns first, then the others by name."""
    return "0" if pd.isna(protocol) or protocol == DEFAULT_PROTOCOL else f"1{protocol}"


def _identities(rows: pd.DataFrame) -> list[str]:
    """The distinct code identities of `rows`: `<digest> (<versions>)`, the versions that
    computed with that digest; rows from code that recorded no digest are known by their
    version alone."""
    if "code_digest" not in rows:
        return _versions(rows)
    out = []
    for digest, group in rows.groupby(rows["code_digest"].fillna(""), sort=True):
        versions = ", ".join(_versions(group))
        out += [f"{digest} ({versions})"] if digest else _versions(group)
    return sorted(set(out))


def _versions(rows: pd.DataFrame) -> list[str]:
    """The distinct code versions of `rows` (`commit X` for jobs from older code)."""
    found = _distinct(rows, "code_version")
    if "code_version" not in rows or rows["code_version"].isna().any():
        found += [f"commit {c}" for c in _distinct(rows, "git_commit")]
    return sorted(set(found))


def _replicates(row: dict, replicates: dict[str, dict[str, np.ndarray]]) -> np.ndarray | None:
    rid = row.get("replicates_id")
    if rid is None or pd.isna(rid):
        return None
    found = replicates.get(str(row["job_dir"]), {}).get(str(rid))
    return None if found is None else np.asarray(found, dtype=float)


def _headline(tasks: dict, task: str, metric: str) -> tuple[int, bool | None] | None:
    """(position, higher_is_better) of `metric` among the task's declared headlines; None
    when the task declares headlines and this is not one; (0, None) when it declares none."""
    declared = (tasks.get(task) or {}).get("headlines") or []
    if not declared:
        return 0, None
    for i, headline in enumerate(declared):
        if headline.get("metric") == metric:
            return i, headline.get("higher_is_better")
    return None


def _varying(settings: list[dict | None], method: bool) -> list[str]:
    """The keys (method.* or the others) whose values differ between `settings`, sorted."""
    known = [s for s in settings if s is not None]
    keys = sorted({k for s in known for k in s if k.startswith("method.") == method})
    missing = object()
    return [k for k in keys if len({_text(s.get(k, missing)) for s in known}) > 1]


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, str) and value.count(".") > 1 and " " not in value:
        return value.rsplit(".", 1)[-1]  # a _target_: its class name
    return str(value)


def _distinct(rows: pd.DataFrame, column: str) -> list[str]:
    return sorted(set(rows[column].dropna().astype(str))) if column in rows else []


def _first(rows: pd.DataFrame, column: str) -> Any:
    found = _distinct(rows, column)
    return found[0] if len(found) == 1 else None


def _key(value: Any) -> Any:
    return None if pd.isna(value) else value


def _none(value: Any) -> Any:
    return None if value is None or pd.isna(value) else value


def _float(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)

"""What every part of the report shares: its error, a job's inputs, and text helpers.

Numbers are written with two decimals (`num`), a missing value as `MISSING`; a row's
(model, layer, hook), the block a table belongs to, is one line of text (`place`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa

from bench.errors import FeatbenchError

log = logging.getLogger(__name__)

MISSING = "—"


class ReportError(FeatbenchError):
    """The report cannot be built from this input; nothing was written."""


class Job(NamedTuple):
    """One job folder: its rows and its features' side files."""

    name: str  # the folder, relative to DIR
    method: str
    rows: pd.DataFrame
    info: dict  # features/features.json "info": the method's fit report
    contexts: list | None  # features/contexts.json: per feature, its top contexts


def supervised_methods(summary: pd.DataFrame) -> set[str]:
    """The methods whose rows say they were fitted with the concept labels."""
    if "supervised" not in summary:
        return set()
    return set(summary.loc[summary["supervised"].eq(True), "method"].dropna().astype(str))


def task_order(cells: pd.DataFrame) -> list[str]:
    """The tasks of `cells` in their declared report order (`task_order`), then by name."""
    first = cells.drop_duplicates("task")
    return first.sort_values(["task_order", "task"], kind="stable")["task"].astype(str).tolist()


def place(rows: pd.DataFrame) -> pd.Series:
    """Each row's (model, layer, hook) as text: the title of the tables it appears in."""
    layer = rows["layer"].astype("string").fillna(MISSING)
    return rows["model"].astype(str) + " · layer " + layer + " · `" + rows["hook"].astype(str) + "`"


def series_labels(rows: pd.DataFrame, several: bool, supervised: set[str]) -> pd.Series:
    """A plot series per setting (its label, the method when rows have none), and per
    (model, layer, hook) too when the rows span `several`."""
    names = rows["setting"].astype(str) if "setting" in rows else rows["method"].astype(str)
    marks = rows["method"].map(lambda m: " (supervised)" if m in supervised else "")
    labels = names + marks
    return labels + " · " + place(rows).str.replace("`", "") if several else labels


def plain(value: Any) -> str:
    """A reference or run value as text: 23.0 -> 23, 0.01 -> 0.01, missing -> —."""
    if value is None or pd.isna(value):
        return MISSING
    return f"{value:g}" if isinstance(value, float) else str(value)


def md_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table; `|` inside a cell is escaped."""
    lines = [header, ["---"] * len(header), *body]
    return "\n".join(
        "| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in lines
    )


def num(value: Any) -> str:
    """Two decimals (two significant digits below 0.01); — when missing."""
    if value is None or pd.isna(value):
        return MISSING
    value = float(value)
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def sign_text(sign: Any) -> str:
    """A steering sign as `sign +1` / `sign -1`."""
    return f"sign {int(sign):+d}"


def inline(text: Any) -> str:
    """Text on one markdown line: newlines shown as ⏎, no raw HTML."""
    return str(text or "").replace("\r", "").replace("\n", " ⏎ ").replace("<", "&lt;")


def contexts_of(job: Job, feature: int) -> list[dict]:
    """The job's top-activating contexts of one feature (empty when it has none)."""
    found = job.contexts[feature] if job.contexts and 0 <= feature < len(job.contexts) else []
    return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []


def norm(name: Any) -> str:
    """A name compared loosely: lower case, letters and digits only (`Top-K SAE` = `topksae`)."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def natural(path: Path) -> list:
    """Sort key that puts job 2 before job 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def one_line(err: BaseException) -> str:
    """An error's message on one line (its type's name when it has none); `error_line`
    (bench.errors) adds the type."""
    return " ".join(str(err).split()) or type(err).__name__


def read_json(path: Path) -> Any:
    """A job's JSON side file, or None (with a log line when it exists but is unreadable)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable, left out (%s)", path, one_line(err))
        return None


def arrow_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns whose values mix types across jobs (a plugin's extras) become text."""
    for column in [c for c in frame.columns if frame[c].dtype == object]:
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frame[column] = frame[column].astype("string")
    return frame


def code_identities(cells: pd.DataFrame) -> list[str]:
    """The distinct code identities of a table's cells, each `<digest> (<versions>)`: the
    versions (commits) that computed with that digest, merged over cells (see
    `bench.report.cells`). More than one means rows computed by code that differs; one
    digest over several commits is one identity."""
    column = "code_identity" if "code_identity" in cells else "code_version"
    versions: dict[str, set[str]] = {}
    for text in cells[column].dropna():
        for entry in filter(None, str(text).split("; ")):
            digest, _, rest = entry.partition(" (")
            if not rest:  # a version alone: code that recorded no digest
                versions.setdefault(entry, set())
                continue
            versions.setdefault(digest, set()).update(rest.rstrip(")").split(", "))
    return [f"{d} ({', '.join(sorted(v))})" if v else d for d, v in sorted(versions.items())]


def mixed_kinds(cells: pd.DataFrame) -> list[str]:
    """The description kinds of steering cells of one protocol (one column of a table) that
    were judged against several kinds, sorted; [] when every protocol has one. Two
    protocols judged against different kinds (concept labels, feature tokens) are separate
    columns, and mix nothing."""
    steering = cells[cells["task"] == "steering"]
    if steering.empty or "description" not in steering:
        return []
    protocol = (
        steering["protocol"].fillna("concept").astype(str)
        if "protocol" in steering
        else pd.Series("concept", index=steering.index)
    )
    found: set[str] = set()
    for _, part in steering.groupby(protocol, sort=False):
        kinds = set(part["description"].dropna().astype(str))
        if len(kinds) > 1:
            found |= kinds
    return sorted(found)

"""Labeled concept sentences: loading, validation and the train/test split.

A dataset is a list of (sentence, label) pairs. The label `neutral` marks
sentences that belong to no concept (the baseline of the SNMF paper's
detection score). Three file formats are read, all with the two fields
`prompt` and `label`:

- JSONL, one object per line (the shipped dataset, `bench/data/concepts.jsonl`);
- JSON, a list of objects (the SNMF paper's format);
- CSV with a header row naming `prompt` and `label`.

Bad files get a `DatasetError` naming the file, the row and what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from bench.core.storage import sha256_json
from bench.errors import FeatbenchError

log = logging.getLogger(__name__)

NEUTRAL = "neutral"
MIN_SENTENCES_PER_CONCEPT = 4  # fewer cannot fill both sides of a 70/30 split
FORMATS = ("auto", "jsonl", "json", "csv")
# The shipped dataset's version, recorded on every result row (`dataset_version`) beside
# its content hash. v2: 32 concepts x 64 sentences + 320 neutral, length-controlled
# (token count alone separates no label: tests/test_datasets.py). v1 had 24 + 80.
SHIPPED_VERSION = "concepts-v2"


class DatasetError(FeatbenchError, ValueError):
    """A dataset file that cannot be used, with the place and the reason."""


@dataclass(frozen=True)
class ConceptDataset:
    """Sentences with their concept label and their split ("train" or "test")."""

    sentences: tuple[str, ...]
    labels: tuple[str, ...]
    splits: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def concepts(self) -> list[str]:
        """Concept names, sorted, without the neutral label."""
        return sorted(set(self.labels) - {NEUTRAL})

    @property
    def content_hash(self) -> str:
        """Hash of the sentences and labels (not the split): the activation-cache key."""
        return sha256_json([list(self.sentences), list(self.labels)])

    @property
    def version(self) -> str:
        """`concepts-v2` for the shipped dataset, else `file:<name>` (the hash tells files apart)."""
        return (
            SHIPPED_VERSION
            if Path(self.source) == shipped_path()
            else f"file:{Path(self.source).name}"
        )

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split], dtype=np.int64)


def shipped_path() -> Path:
    """The project's own concept dataset, installed as package data."""
    return Path(str(resources.files("bench.data").joinpath("concepts.jsonl")))


def load(
    path: str | None = None,
    format: str = "auto",
    test_fraction: float = 0.3,
    split_seed: int = 0,
    concepts: list[str] | None = None,
    max_per_concept: int | None = None,
    max_neutral: int | None = None,
    name: str = "concepts",
) -> ConceptDataset:
    """Read, validate, optionally subsample, and split a concept dataset (the `dataset`
    config group's default `_target_`; `name` is what the log calls it)."""
    file = Path(path).expanduser() if path else shipped_path()
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(
            f"test_fraction={test_fraction!r}: must be in [0, 1) (0: every sentence in train, "
            "as the SNMF paper fits on all tokens)"
        )
    records = read_records(file, format)
    sentences, labels = validate(records, file)
    sentences, labels = _select(sentences, labels, concepts, max_per_concept, max_neutral, file)
    splits = stratified_split(labels, test_fraction, split_seed, sentences)
    dataset = ConceptDataset(tuple(sentences), tuple(labels), tuple(splits), str(file))
    log.info(
        "dataset %s (%s): %d sentences, %d concepts, %d neutral, %d train / %d test",
        name,
        file.name,
        len(dataset),
        len(dataset.concepts),
        labels.count(NEUTRAL),
        splits.count("train"),
        splits.count("test"),
    )
    return dataset


def read_records(file: Path, format: str = "auto") -> list[tuple[str, dict]]:
    """Parse a file into (row name, record) pairs, without checking the fields."""
    if format not in FORMATS:
        raise DatasetError(f"format={format!r} for {file}: allowed formats are {list(FORMATS)}")
    if not file.is_file():
        raise DatasetError(f"{file}: no such dataset file")
    if format == "auto":
        format = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}.get(file.suffix.lower(), "")
        if not format:
            raise DatasetError(
                f"{file}: cannot tell the format from the suffix {file.suffix!r}; "
                f"use .jsonl, .json or .csv, or set dataset.format to one of {list(FORMATS[1:])}"
            )
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DatasetError(
            f"{file}, line {line}: not UTF-8 ({err.reason} at byte {err.start})"
        ) from None
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[format](text, file)


def _read_jsonl(text: str, file: Path) -> list[tuple[str, dict]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{file}, line {number}: not valid JSONL ({err.msg})") from None
        records.append((f"line {number}", obj))
    return records


def _read_json(text: str, file: Path) -> list[tuple[str, dict]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{file}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(obj, list):
        raise DatasetError(
            f"{file}: expected a JSON list of {{'prompt', 'label'}} objects, got {type(obj).__name__}"
        )
    return [(f"item {i}", item) for i, item in enumerate(obj, start=1)]


def _read_csv(text: str, file: Path) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [field for field in ("prompt", "label") if field not in header]
    if missing:
        raise DatasetError(
            f"{file}, line 1: CSV header {header} lacks {missing}; expected columns 'prompt' and 'label'"
        )
    try:
        return [(f"line {reader.line_num}", dict(row)) for row in reader]
    except csv.Error as err:
        raise DatasetError(f"{file}, line {reader.line_num}: not valid CSV ({err})") from None


def validate(records: list[tuple[str, dict]], file: Path) -> tuple[list[str], list[str]]:
    """Check every record; return the stripped sentences and labels."""
    if not records:
        raise DatasetError(f"{file}: the dataset is empty")
    sentences, labels, seen = [], [], {}
    for row, obj in records:
        if not isinstance(obj, dict):
            raise DatasetError(f"{file}, {row}: expected an object with 'prompt' and 'label'")
        for field in ("prompt", "label"):
            if field not in obj or obj[field] is None:
                raise DatasetError(f"{file}, {row}: missing field {field!r}")
            if not isinstance(obj[field], str):
                raise DatasetError(
                    f"{file}, {row}: field {field!r} must be a string, got {type(obj[field]).__name__}"
                )
            if not obj[field].strip():
                raise DatasetError(f"{file}, {row}: empty {field!r}")
        sentence, label = obj["prompt"].strip(), obj["label"].strip()
        key = " ".join(sentence.lower().split())  # the same text up to case and spacing
        if key in seen:
            raise DatasetError(
                f"{file}, {row}: duplicate sentence (same as {seen[key]}): {sentence!r}"
            )
        seen[key] = row
        sentences.append(sentence)
        labels.append(label)
    counts = {label: labels.count(label) for label in set(labels) - {NEUTRAL}}
    small = {label: n for label, n in sorted(counts.items()) if n < MIN_SENTENCES_PER_CONCEPT}
    if small:
        raise DatasetError(
            f"{file}: concepts with fewer than {MIN_SENTENCES_PER_CONCEPT} sentences: {small}"
        )
    if not counts:
        raise DatasetError(f"{file}: no concept labels besides {NEUTRAL!r}")
    near: dict[str, list[str]] = {}
    for (row, _), sentence in zip(records, sentences, strict=True):
        near.setdefault(near_key(sentence), []).append(row)
    for rows in (r for r in near.values() if len(r) > 1):
        log.warning(
            "%s: %s differ only in punctuation, case or spacing; the split keeps them on one side",
            file,
            " and ".join(rows),
        )
    return sentences, labels


def near_key(sentence: str) -> str:
    """A sentence without case, punctuation and spacing: near-duplicates share it."""
    return "".join(ch for ch in sentence.lower() if ch.isalnum())


def _select(sentences, labels, concepts, max_per_concept, max_neutral, file):
    """Keep the chosen concepts and at most N sentences of each, in file order."""
    if concepts is not None:
        unknown = sorted(set(concepts) - set(labels))
        if unknown:
            raise DatasetError(
                f"dataset.concepts has {unknown}, not in {file}; available: {sorted(set(labels) - {NEUTRAL})}"
            )
    for name, value in (("max_per_concept", max_per_concept), ("max_neutral", max_neutral)):
        if value is not None and value < 0:
            raise DatasetError(f"dataset.{name}={value}: must be >= 0 or null (no limit)")
    if max_per_concept is not None and max_per_concept < MIN_SENTENCES_PER_CONCEPT:
        raise DatasetError(
            f"dataset.max_per_concept={max_per_concept}: must be >= {MIN_SENTENCES_PER_CONCEPT} or null"
        )
    kept, taken = [], {}
    for sentence, label in zip(sentences, labels, strict=True):
        if label != NEUTRAL and concepts is not None and label not in concepts:
            continue
        cap = max_neutral if label == NEUTRAL else max_per_concept
        if cap is not None and taken.get(label, 0) >= cap:
            continue
        taken[label] = taken.get(label, 0) + 1
        kept.append((sentence, label))
    return [s for s, _ in kept], [label for _, label in kept]


def stratified_split(
    labels: list[str], test_fraction: float, seed: int, sentences: list[str] | None = None
) -> list[str]:
    """Assign "train"/"test" per sentence, the same fraction within every label.

    Keyed by sentence: each sentence draws a number from a hash of (seed, its text without
    case, punctuation and spacing); within a label the sentences with the smallest numbers
    go to the test split. So the split is a function of the seed and the sentences
    themselves: renaming a label, reordering the file or adding other sentences does not
    move a sentence, and near-duplicates (same key) land on the same side. Each label with
    at least two distinct keys gets at least one sentence on each side. Without
    `sentences`, a sentence is keyed by its position (for callers that have only labels).
    """
    keys = (
        [near_key(s) for s in sentences]
        if sentences is not None
        else list(map(str, range(len(labels))))
    )
    draw = {k: int(sha256_json([seed, k])[:15], 16) for k in set(keys)}
    side: dict[str, str] = {}  # key -> split: a key met again (near-duplicates) keeps its side
    for label in sorted(set(labels)):
        members = [i for i, x in enumerate(labels) if x == label]
        groups = sorted(dict.fromkeys(keys[i] for i in members), key=lambda k: (draw[k], k))
        n_test = int(round(len(members) * test_fraction))
        if len(groups) >= 2 and test_fraction > 0:
            n_test = min(max(n_test, 1), len(members) - 1)
        taken = sum(1 for i in members if side.get(keys[i]) == "test")
        for key in groups:
            if key in side:
                continue
            count = sum(1 for i in members if keys[i] == key)
            side[key] = "test" if taken < n_test else "train"
            taken += count if side[key] == "test" else 0
        if len(groups) >= 2 and all(side[k] == "test" for k in groups) and n_test:
            side[groups[-1]] = "train"  # never a label without training sentences
    return [side[k] for k in keys]

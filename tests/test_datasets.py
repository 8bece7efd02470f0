"""The shipped concept dataset, the loaders, the split and bad-data errors."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from bench.data import datasets
from bench.data.datasets import NEUTRAL, DatasetError


@pytest.fixture(scope="module")
def shipped():
    return datasets.load()


def test_shipped_dataset_size_and_coverage(shipped):
    counts = Counter(shipped.labels)
    concepts = {c: n for c, n in counts.items() if c != NEUTRAL}
    assert len(concepts) >= 32
    assert min(concepts.values()) >= 60
    assert counts[NEUTRAL] >= 300
    test = Counter(
        lab for lab, s in zip(shipped.labels, shipped.splits, strict=True) if s == "test"
    )
    assert min(test[c] for c in concepts) >= 18  # per concept in the test split
    for required in (
        "food",
        "sports",
        "law_enforcement",
        "music",
        "programming_code",
        "weather",
        "questions",
        "past_tense",
        "numbers_dates",
        "lists",
        "french",
        "spanish",
        "german",
    ):
        assert required in concepts, required
    assert shipped.version == datasets.SHIPPED_VERSION


def test_shipped_sentences_are_natural_and_distinct(shipped):
    lengths = [len(s.split()) for s in shipped.sentences]
    assert min(lengths) >= 5 and max(lengths) <= 40
    # No near-duplicates: the same text after case, punctuation and spacing are dropped...
    normal = Counter(re.sub(r"[\W_]+", "", s.lower()) for s in shipped.sentences)
    assert normal.most_common(1)[0][1] == 1, normal.most_common(3)
    # ... and no template: at most two sentences share their first five words.
    openings = Counter(" ".join(s.lower().split()[:5]) for s in shipped.sentences)
    assert openings.most_common(1)[0][1] <= 2, openings.most_common(3)


@pytest.mark.integration
def test_token_count_alone_separates_no_label(shipped):
    """Length control: token count (the embedded model's tokenizer) used as a score gives a
    one-vs-rest AUROC within [0.35, 0.65] for every concept and for neutral."""
    from transformers import AutoTokenizer

    from bench.models import embedded_gguf_path
    from featbench.tasks.concept_detection import auroc_matrix

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    counts = np.array(
        [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in shipped.sentences],
        dtype=float,
    )
    labels = np.array(shipped.labels)
    names = sorted(set(labels))
    auc = auroc_matrix(counts[:, None], labels[:, None] == np.array(names)[None, :])[:, 0]
    outside = {
        n: round(float(a), 3) for n, a in zip(names, auc, strict=True) if not 0.35 <= a <= 0.65
    }
    assert not outside, outside


def test_split_is_stratified_deterministic_and_70_30(shipped):
    again = datasets.load()
    assert again.splits == shipped.splits
    other_seed = datasets.load(split_seed=1)
    assert other_seed.splits != shipped.splits
    for label in set(shipped.labels):
        members = [s for s, lab in zip(shipped.splits, shipped.labels, strict=True) if lab == label]
        share = members.count("test") / len(members)
        assert abs(share - 0.3) <= 0.5 / len(members) + 1e-9, (label, share)


def test_stratified_split_is_a_function_of_its_seed():
    labels = ["a"] * 10 + ["b"] * 10 + [NEUTRAL] * 10
    first = datasets.stratified_split(labels, 0.3, seed=0)
    assert datasets.stratified_split(labels, 0.3, seed=0) == first
    other = datasets.stratified_split(labels, 0.3, seed=1)
    assert other != first
    for split in (first, other):  # still stratified: 3 of each label's 10 in the test split
        assert Counter(lab for lab, s in zip(labels, split, strict=True) if s == "test") == {
            "a": 3,
            "b": 3,
            NEUTRAL: 3,
        }


def test_split_is_keyed_by_sentence_not_by_label_or_order(tmp_path, shipped):
    """Renaming a label or reordering the file moves no sentence across the split."""
    records = [
        {"prompt": s, "label": lab}
        for s, lab in zip(shipped.sentences, shipped.labels, strict=True)
    ]
    renamed = [{**r, "label": "cuisine" if r["label"] == "food" else r["label"]} for r in records]
    shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    for name, rows in (("renamed", renamed), ("shuffled", shuffled)):
        file = tmp_path / f"{name}.jsonl"
        file.write_text("\n".join(json.dumps(r) for r in rows))
        other = datasets.load(str(file))
        side = dict(zip(other.sentences, other.splits, strict=True))
        assert [side[s] for s in shipped.sentences] == list(shipped.splits), name


def test_near_duplicates_stay_on_one_side_of_the_split(tmp_path, caplog):
    base = [f"Sentence {w} about the topic here" for w in "abcdefghijklmnopqrst"]
    rows = [{"prompt": s, "label": "x" if i < 10 else "y"} for i, s in enumerate(base)]
    rows += [
        {"prompt": s.replace(" here", ", here!").upper(), "label": r["label"]}
        for s, r in zip(base, rows, strict=True)
    ]
    file = tmp_path / "near.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows))
    for seed in range(5):
        data = datasets.load(str(file), split_seed=seed)
        side = {}
        for sentence, split in zip(data.sentences, data.splits, strict=True):
            assert side.setdefault(datasets.near_key(sentence), split) == split
        assert {"train", "test"} <= set(data.splits)
    assert "differ only in punctuation, case or spacing" in caplog.text


def test_test_fraction_0_puts_every_sentence_in_train():
    """The SNMF paper fits on every token: test_fraction=0 is allowed and leaves no test split."""
    data = datasets.load(test_fraction=0.0)
    assert set(data.splits) == {"train"} and len(data.indices("test")) == 0


def test_selection_caps_and_filters(shipped):
    small = datasets.load(concepts=["food", "french"], max_per_concept=5, max_neutral=7)
    counts = Counter(small.labels)
    assert counts == {"food": 5, "french": 5, NEUTRAL: 7}
    with pytest.raises(DatasetError, match="not_a_concept"):
        datasets.load(concepts=["not_a_concept"])


def _records(n_per=4, labels=("a", "b")):
    return [
        {"prompt": f"sentence number {i} about {lab} things", "label": lab}
        for lab in labels
        for i in range(n_per)
    ]


def test_formats_jsonl_json_csv_read_the_same(tmp_path):
    rows = _records() + [{"prompt": "A plain, neutral sentence; with a comma.", "label": NEUTRAL}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))  # the SNMF paper's format
    lines = ["prompt,label"] + [f'"{r["prompt"]}",{r["label"]}' for r in rows]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    loaded = [datasets.load(str(tmp_path / f"d.{ext}")) for ext in ("jsonl", "json", "csv")]
    assert loaded[0].sentences == loaded[1].sentences == loaded[2].sentences
    assert loaded[0].labels == loaded[1].labels == loaded[2].labels
    assert loaded[0].content_hash == loaded[2].content_hash


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "only a prompt here"}', r"line 1: missing field 'label'"),
        ('{"label": "a"}', r"line 1: missing field 'prompt'"),
        ('{"prompt": "   ", "label": "a"}', r"line 1: empty 'prompt'"),
        ('{"prompt": "text", "label": ""}', r"line 1: empty 'label'"),
        ("this is not json", r"line 1: not valid JSONL"),
    ],
)
def test_bad_jsonl_rows_are_named(tmp_path, content, message):
    file = tmp_path / "bad.jsonl"
    good = "\n".join(json.dumps(r) for r in _records())
    file.write_text(content + "\n" + good)
    with pytest.raises(DatasetError, match=message) as err:
        datasets.load(str(file))
    assert str(file) in str(err.value)


def test_too_few_sentences_for_a_concept(tmp_path):
    file = tmp_path / "few.jsonl"
    rows = _records() + [
        {"prompt": "only three of these", "label": "c"},
        {"prompt": "second c", "label": "c"},
        {"prompt": "third c one", "label": "c"},
    ]
    file.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match=r"fewer than 4 sentences: \{'c': 3\}"):
        datasets.load(str(file))


def test_duplicate_sentences_name_both_rows(tmp_path):
    file = tmp_path / "dup.jsonl"
    rows = _records() + [{"prompt": "Sentence number 0 about a   things", "label": "b"}]
    file.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match=r"line 9: duplicate sentence \(same as line 1\)"):
        datasets.load(str(file))


def test_not_utf8(tmp_path):
    file = tmp_path / "latin1.jsonl"
    file.write_bytes(
        json.dumps({"prompt": "caf\u00e9 au lait", "label": "a"}, ensure_ascii=False).encode(
            "latin-1"
        )
    )
    with pytest.raises(DatasetError, match=r"latin1.jsonl, line 1: not UTF-8"):
        datasets.load(str(file))


def test_not_the_format_claimed(tmp_path):
    jsonl_content = "\n".join(json.dumps(r) for r in _records())
    (tmp_path / "claims.json").write_text(jsonl_content)
    with pytest.raises(DatasetError, match=r"claims.json, line 2: not valid JSON"):
        datasets.load(str(tmp_path / "claims.json"))
    (tmp_path / "claims.csv").write_text(jsonl_content)
    with pytest.raises(DatasetError, match=r"claims.csv, line 1: CSV header .* lacks"):
        datasets.load(str(tmp_path / "claims.csv"))
    (tmp_path / "obj.json").write_text('{"prompt": "x", "label": "y"}')
    with pytest.raises(DatasetError, match="expected a JSON list"):
        datasets.load(str(tmp_path / "obj.json"))
    with pytest.raises(DatasetError, match="allowed formats"):
        datasets.load(str(tmp_path / "claims.json"), format="yaml")
    (tmp_path / "d.txt").write_text(jsonl_content)
    with pytest.raises(DatasetError, match="cannot tell the format"):
        datasets.load(str(tmp_path / "d.txt"))
    assert len(datasets.load(str(tmp_path / "d.txt"), format="jsonl")) == 8


def test_missing_file_and_bad_fraction(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        datasets.load(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DatasetError, match="test_fraction=1.5"):
        datasets.load(test_fraction=1.5)

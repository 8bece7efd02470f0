"""The hf_chat judge: config and fail-fast loading; wiring tests (a scripted `_generate`:
batching, per-batch failures, counting); and the real embedded SmolLM2-135M-Instruct,
whose every raw answer is recorded and checked against the judgement made from it."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from hydra import compose, initialize_config_dir

from bench.errors import FeatbenchError
from bench.job.plugins import build
from bench.judges.base import CONCEPT_PROMPT, FLUENCY_PROMPT, UNPARSABLE, Judge, Judgement
from bench.judges.hf_chat import HFChatJudge
from bench.models import EMBEDDED_NAME, ModelUnavailable
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


def scripted(monkeypatch, answer) -> None:
    """Wiring only: `_generate` answers each prompt with `answer(prompt)`; nothing loads."""

    def generate(self, batch: list[str], max_tokens: int) -> list[str]:
        if any("OOM" in prompt for prompt in batch):
            raise torch.OutOfMemoryError("CUDA out of memory")
        if any("BUG" in prompt for prompt in batch):
            raise TypeError("a bug in the judge")
        return [answer(prompt) for prompt in batch]

    monkeypatch.setattr(HFChatJudge, "_load", lambda self: None)
    monkeypatch.setattr(HFChatJudge, "_generate", generate)


def test_wiring_a_bug_or_out_of_memory_in_a_batch_is_raised_not_recorded_as_missing(monkeypatch):
    """Issue 25: a per-batch `except Exception` used to turn a TypeError or an
    out-of-memory error into missing judgements."""
    scripted(monkeypatch, lambda prompt: "Clearly there. Rating: [[2]]")
    judge = HFChatJudge(batch_size=2)
    with pytest.raises(TypeError, match="a bug in the judge"):
        judge.concept(["a cat", "BUG", "a dog", "a cow"], "animals", baseline=[])
    with pytest.raises(
        FeatbenchError, match=r"batch of 2 prompts; lower judge.batch_size \(now 2\)"
    ):
        judge.concept(["a cat", "OOM", "a dog", "a cow"], "animals", baseline=[])
    scores = judge.concept(["a cat", "a dog"], "animals", baseline=[])
    assert [s.score for s in scores] == [2.0, 2.0]


def test_wiring_unparsable_answers_are_missing_with_the_answer_and_counted(monkeypatch):
    scripted(monkeypatch, lambda p: "Rating: **[2]**" if "dog" in p else "Fine. Rating: [[1]]")
    judge = HFChatJudge()
    scores = judge.fluency(["a cat", "a dog", "", "a dog again"], "Write:")
    assert [s.score for s in scores] == [1.0, None, None, None]
    assert scores[1].reason.startswith(UNPARSABLE) and "**[2]**" in scores[1].reason
    assert scores[2].reason == "empty text"  # never asked
    stats = judge.stats()
    assert (stats["requests"], stats["failed_requests"], stats["unparsable"]) == (3, 0, 2)


# --- the real embedded judge -----------------------------------------------------------

TEXTS = [
    "The cat curled up on the warm windowsill and purred at the birds outside.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "the the of of and and and cat cat",
]
RATING = re.compile(r"Rating:\s*\[\[\s*([0-2])\s*\]\]")  # the format, written out again here


@pytest.fixture(scope="module")
def judge() -> HFChatJudge:
    return HFChatJudge(device="cpu")  # loads on first use (~20-30 s: dequantizes the GGUF)


@pytest.fixture()
def answers(judge, monkeypatch) -> list[str | Exception]:
    """Every raw answer the real model gives during the test, in order."""
    recorded: list[str | Exception] = []
    complete = judge.complete

    def recording(prompts: list[str], max_tokens: int, **kwargs) -> list[str | Exception]:
        got = complete(prompts, max_tokens, **kwargs)
        recorded.extend(got)
        return got

    monkeypatch.setattr(judge, "complete", recording)
    return recorded


def check_against_answers(judgements: list[Judgement], answers: list) -> int:
    """Each judgement is what its raw answer says: the last rating where the model wrote
    the format, else missing with the unparsable reason quoting the answer. Returns the
    number of unparsable answers."""
    assert len(judgements) == len(answers)
    unparsable = 0
    for judgement, answer in zip(judgements, answers, strict=True):
        assert isinstance(answer, str) and answer.strip(), answer  # the model wrote text
        found = RATING.findall(answer)
        if found:
            assert judgement == Judgement(float(found[-1])), (answer, judgement)
        else:
            unparsable += 1
            assert judgement.score is None and judgement.reason.startswith(UNPARSABLE), judgement
            assert " ".join(answer.split())[:40] in judgement.reason  # it quotes the answer
    log.info("answers: %s", answers)
    return unparsable


@pytest.mark.integration
def test_embedded_judge_rates_every_answer_it_received(judge, answers):
    before = judge.stats()
    judgements = judge.concept(TEXTS, "animals", baseline=[])
    judgements += judge.fluency(TEXTS, "Write one sentence:")
    unparsable = check_against_answers(judgements, answers)
    delta = {k: v - before[k] for k, v in judge.stats().items()}
    assert delta["requests"] == len(answers) == 2 * len(TEXTS)
    assert delta["failed_requests"] == 0
    assert delta["unparsable"] == unparsable  # counted exactly
    assert delta["prompt_tokens"] > 2 * len(TEXTS) * 50  # each rubric prompt is > 50 tokens
    assert delta["completion_tokens"] >= len(answers)


#: asked for the format outright, the 135M model writes "Rating: [2]" (greedy, both through
#: transformers and llama.cpp): a known answer, one bracket short of the format
NEAR_MISS = 'Answer with the text "Rating: [[2]]" only.'


@pytest.mark.integration
def test_embedded_judge_refuses_a_near_miss_and_says_why(judge, answers):
    """A crafted prompt with a known raw answer, through `_rate` (generation, decoding,
    parsing, counting): the answer arrives, is not taken for a 2, and is counted."""
    before = judge.stats()["unparsable"]
    (judgement,) = judge._rate([NEAR_MISS])
    (answer,) = answers
    assert "Rating: [2]" in answer and not RATING.search(answer), answer
    assert judgement.score is None and judgement.reason.startswith(UNPARSABLE)
    assert "Rating: [2]" in judgement.reason
    assert judge.stats()["unparsable"] == before + 1


@pytest.mark.integration
def test_embedded_judge_describes(judge, answers):
    description = judge.describe(["the [[cat]] sat", "a [[dog]] barked", "two [[horses]] ran"])
    (answer,) = answers
    assert isinstance(answer, str) and description  # the model answered; the text is kept
    assert description == " ".join(answer.split()).strip(" .\"'")


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
    assert all(isinstance(a, str) and a.strip() for a in batched + single), batched + single
    assert batched == single


def test_wiring_writing_samples_per_prompt_and_attempt_and_leaves_the_rng_alone(monkeypatch):
    """`write` samples at write_temperature from a generator seeded by (prompt, attempt):
    the same pair gives the same answer, another attempt another draw, and the process's
    random state is what it was (a scripted `_generate` draws from torch's RNG)."""
    import torch

    class Device:
        type, index = "cpu", None

    def generate(self, batch, max_tokens, temperature=0.0):
        assert temperature == 1.0 and len(batch) == 1  # sampled prompts go one at a time
        return [f"draw {torch.rand(1).item():.6f}"]

    monkeypatch.setattr(
        HFChatJudge,
        "_load",
        lambda self: setattr(self, "_hf", type("M", (), {"device": Device()})()),
    )
    monkeypatch.setattr(HFChatJudge, "_generate", generate)
    judge = HFChatJudge()
    state = torch.get_rng_state()
    first = judge.write("Write one sentence.", 20)
    assert judge.write("Write one sentence.", 20) == first
    assert judge.write("Write one sentence.", 20, attempt=2) != first
    assert judge.write("Write another.", 20) != first
    assert torch.equal(torch.get_rng_state(), state)
    assert judge.with_policy(2).attempts == 2 and judge.attempts == 1  # a copy, not a change

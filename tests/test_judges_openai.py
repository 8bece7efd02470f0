"""The `openai` judge: wiring tests against a scripted server (fast: requests, retries,
faults, cache, key handling; the answers are ours, so they prove the plumbing, not a
judgement), and a real OpenAI-compatible server (llama-cpp-python's, serving the
embedded SmolLM2), whose every raw answer is read back from the cache and checked
against the judgement made from it."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from bench.errors import ConfigError, JudgeUnreachable
from bench.judges.openai import OpenAIJudge
from tests.openai_double import OpenAIDouble, Reply, Script, chat_reply, serving

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["The cat chased the mouse across the kitchen floor.", "Stocks fell sharply on Monday."]
RATING = re.compile(r"Rating:\s*\[\[\s*([0-2])\s*\]\]")  # the format, written out again here


# --- wiring: a scripted OpenAI-compatible server -------------------------------------


@pytest.fixture()
def fake_api() -> Iterator[Callable[[Script], OpenAIDouble]]:
    """Start doubles answering with a script (tests/openai_double.py); stopped at the end."""
    with ExitStack() as stack:
        yield lambda script: stack.enter_context(serving(script))


def make_judge(url: str, tmp_path: Path, **kwargs) -> OpenAIJudge:
    """Small timeouts and backoff, so every fault test takes well under a second."""
    args = {
        "base_url": url,
        "model": "fake",
        "api_key_env": None,
        "timeout": 2.0,
        "max_retries": 3,
        "backoff": 0.01,
        "concurrency": 2,
        "cache_dir": str(tmp_path / "judge"),
    }
    return OpenAIJudge(**(args | kwargs))


# --- wiring: fault paths ---------------------------------------------------------


def test_retries_5xx_and_429_then_succeeds(fake_api, tmp_path):
    failures = [500, 429, 503]
    server = fake_api(
        lambda n, _: (failures[n], b"{}") if n < 3 else chat_reply("Ok. Rating: [[2]]")
    )
    judge = make_judge(server.url, tmp_path)

    (judgement,) = judge.fluency(["A fluent sentence."], "Write something.")

    assert judgement.score == 2.0
    stats = judge.stats()
    assert (stats["requests"], stats["retries"], stats["failed_requests"]) == (4, 3, 0)
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "fake"
    assert request["body"]["temperature"] == 0
    assert request["body"]["max_tokens"] == OpenAIJudge.max_answer_tokens
    assert request["body"]["messages"][0]["role"] == "user"
    assert "A fluent sentence." in request["body"]["messages"][0]["content"]
    assert "Authorization" not in request["headers"]  # api_key_env=None sends no key


def test_5xx_after_all_retries_is_missing_and_logged_once(fake_api, tmp_path, caplog):
    server = fake_api(lambda n, _: (500, b'{"error": "overloaded"}'))
    judge = make_judge(server.url, tmp_path, max_retries=2)

    with caplog.at_level(logging.WARNING, logger="bench.judges.openai"):
        judgements = judge.concept(TEXTS, "animals", baseline=[])

    assert all(j.score is None and "HTTP 500" in j.reason for j in judgements)
    assert "overloaded" in judgements[0].reason
    stats = judge.stats()
    assert (stats["requests"], stats["failed_requests"]) == (6, 2)  # 2 texts x (1 + 2 retries)
    assert len(server.requests) == 6
    assert len([r for r in caplog.records if "HTTP 500" in r.getMessage()]) == 1
    assert not list((tmp_path / "judge").rglob("*.json"))  # failures are never cached


def test_400_is_not_retried(fake_api, tmp_path):
    server = fake_api(lambda n, _: (400, b'{"error": "bad model"}'))
    judge = make_judge(server.url, tmp_path)

    (judgement,) = judge.fluency(["Some text."], "Prompt.")

    assert judgement.score is None and "HTTP 400" in judgement.reason
    assert len(server.requests) == 1
    assert judge.stats()["failed_requests"] == 1


def test_garbage_body_is_missing_not_retried(fake_api, tmp_path):
    server = fake_api(lambda n, _: (200, b"<html>definitely not json</html>"))
    judge = make_judge(server.url, tmp_path)

    (judgement,) = judge.fluency(["Some text."], "Prompt.")

    assert judgement.score is None and "invalid response" in judgement.reason
    assert len(server.requests) == 1


def test_unparsable_answer_is_missing_and_counted(fake_api, tmp_path):
    server = fake_api(lambda n, _: chat_reply("Rating: **[2]**"))  # what SmolLM2 tends to write
    judge = make_judge(server.url, tmp_path)

    judgements = judge.fluency(TEXTS, "Prompt.")

    assert all(j.score is None and j.reason.startswith("unparsable") for j in judgements)
    assert judge.stats()["unparsable"] == 2


def test_timeout_is_missing_with_reason(fake_api, tmp_path):
    def slow(n: int, _: dict) -> Reply:
        time.sleep(1.0)
        return chat_reply("Rating: [[2]]")

    server = fake_api(slow)
    judge = make_judge(server.url, tmp_path, timeout=0.2, max_retries=1)

    start = time.perf_counter()
    (judgement,) = judge.fluency(["Some text."], "Prompt.")

    assert time.perf_counter() - start < 2.0
    assert judgement.score is None and "timeout" in judgement.reason
    assert (judge.stats()["requests"], judge.stats()["failed_requests"]) == (2, 1)


def test_connection_refused_is_missing_with_reason(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    judge = make_judge(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=1)

    (judgement,) = judge.fluency(["Some text."], "Prompt.")

    assert judgement.score is None and "connection error" in judgement.reason


def test_unreachable_endpoint_fails_the_check_naming_the_url(tmp_path):
    """Issue 18: one request before the model loads; a refused connection is an error that
    names the URL (and never the credentials a URL may carry)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = make_judge(f"http://user:hunter2secret@127.0.0.1:{port}/v1", tmp_path)
    with pytest.raises(JudgeUnreachable, match=rf"127.0.0.1:{port}/v1/models cannot be reached"):
        judge.check_reachable()
    with pytest.raises(JudgeUnreachable) as info:
        judge.check_reachable()
    assert "hunter2secret" not in str(info.value)


def test_reachability_accepts_any_answer_but_a_refused_key(fake_api, tmp_path, monkeypatch):
    """A server without a /models route (404) answered, so it is reachable; 401/403 means the
    key is wrong, which every judgement would hit: refused now, naming the variable."""
    monkeypatch.setenv("FEATBENCH_TEST_JUDGE_KEY", "abc")
    answers = iter([(404, b"no such route"), (200, b"{}"), (401, b"bad key")])
    server = fake_api(lambda n, request: next(answers))
    judge = make_judge(server.url, tmp_path, api_key_env="FEATBENCH_TEST_JUDGE_KEY")
    judge.check_reachable()
    judge.check_reachable()
    assert [r["path"] for r in server.requests] == ["/v1/models", "/v1/models"]
    assert server.requests[0]["headers"]["Authorization"] == "Bearer abc"
    with pytest.raises(JudgeUnreachable, match=r"refused the key \(HTTP 401\); check \$FEATBENCH"):
        judge.check_reachable()


def test_disk_cache_and_cost(fake_api, tmp_path):
    server = fake_api(lambda n, _: chat_reply("Clear. Rating: [[1]]", 1_000_000, 500_000))
    judge = make_judge(server.url, tmp_path)

    first = judge.concept(TEXTS, "animals", baseline=[])
    again = make_judge(server.url, tmp_path).concept(TEXTS, "animals", baseline=[])

    assert [j.score for j in first] == [j.score for j in again] == [1.0, 1.0]
    assert len(server.requests) == 2  # the second judge (a re-run) paid nothing
    stats = judge.stats()
    assert stats["prompt_tokens"] == 2_000_000 and stats["completion_tokens"] == 1_000_000
    assert stats["cost_usd"] == pytest.approx(2 * 0.15 + 1 * 0.60)
    assert len(list((tmp_path / "judge").rglob("*.json"))) == 2
    other_model = make_judge(server.url, tmp_path, model="other")
    other_model.concept(TEXTS[:1], "animals", baseline=[])
    assert len(server.requests) == 3  # the model is part of the key


def test_describe_returns_the_concept(fake_api, tmp_path):
    server = fake_api(lambda n, _: chat_reply(' "Animals and pets." '))
    judge = make_judge(server.url, tmp_path)

    assert judge.describe(["the [[cat]] sat", "a [[dog]] barked"]) == "Animals and pets"
    assert server.requests[0]["body"]["max_tokens"] == 24


# --- the API key ----------------------------------------------------------------

SECRET = "planted-test-secret-0123456789"  # not shaped like any real provider's key


def test_missing_key_variable_fails_early_naming_it(monkeypatch):
    monkeypatch.delenv("FEATBENCH_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$FEATBENCH_TEST_JUDGE_KEY"):
        OpenAIJudge(api_key_env="FEATBENCH_TEST_JUDGE_KEY")


def test_key_is_sent_but_never_stored_logged_or_reported(fake_api, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FEATBENCH_TEST_JUDGE_KEY", SECRET)

    def echo(n: int, request: dict) -> Reply:  # a hostile server echoing what it got
        status = (401, 500, 200)[n % 3]
        return status, json.dumps({"error": request["headers"].get("Authorization")}).encode()

    server = fake_api(echo)
    judge = make_judge(server.url, tmp_path, api_key_env="FEATBENCH_TEST_JUDGE_KEY", max_retries=0)

    with caplog.at_level(logging.DEBUG):
        judgements = judge.fluency(["one", "two", "three"], "Prompt.")

    assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert all(j.score is None for j in judgements)
    reasons = " ".join(j.reason for j in judgements)
    assert "HTTP 401" in reasons and "HTTP 500" in reasons and "invalid response" in reasons
    assert SECRET not in reasons
    assert SECRET not in caplog.text
    assert SECRET not in repr(judge) and SECRET not in str(vars(judge))
    assert "FEATBENCH_TEST_JUDGE_KEY" in repr(judge)  # the name is fine to show


# --- the config ------------------------------------------------------------------


def test_yaml_names_every_argument_with_the_class_defaults(monkeypatch):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    conf = yaml.safe_load((REPO / "conf/judge/openai.yaml").read_text())
    fields = {f.name: f.default for f in dataclasses.fields(OpenAIJudge) if f.init}

    assert conf.pop("_target_") == "bench.judges.openai.OpenAIJudge"
    assert conf == fields
    judge = instantiate(OmegaConf.load(REPO / "conf/judge/openai.yaml"))
    assert isinstance(judge, OpenAIJudge) and judge.name == "openai"


# --- a real OpenAI-compatible server ---------------------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """llama-cpp-python's server on loopback, serving the embedded SmolLM2 GGUF."""
    pytest.importorskip("llama_cpp.server", reason="pip install 'llama-cpp-python[server]'")
    from bench.models import embedded_gguf_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_file = tmp_path_factory.mktemp("llama-server") / "server.log"
    # tests/llama_server.py is `python -m llama_cpp.server` with llama.cpp's AMX/repack
    # buffers off: a CPU that advertises AMX in a VM that refuses it dies with SIGILL.
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("llama_server.py")),
        "--model",
        str(embedded_gguf_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--verbose",
        "False",
    ]
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}):\n{log_file.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not up after 60 s:\n{log_file.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def real_judge(url: str, tmp_path: Path) -> OpenAIJudge:
    return OpenAIJudge(
        base_url=url,
        model="smollm2",
        api_key_env=None,
        timeout=120.0,
        max_retries=1,
        backoff=0.5,
        concurrency=2,
        cache_dir=str(tmp_path / "judge"),
    )


def describe_prompt(contexts: list[str]) -> str:
    from bench.judges.base import DESCRIBE_PROMPT

    return DESCRIBE_PROMPT.format(contexts="\n".join(f"- {c}" for c in contexts))


def recorded_answer(judge: OpenAIJudge, prompt: str, max_tokens: int) -> str:
    """The raw answer the server gave for `prompt`, as the judge's cache recorded it."""
    entry = json.loads(judge._cache_path(prompt, max_tokens).read_text())
    assert entry["key"]["prompt"] == prompt
    return entry["answer"]


@pytest.mark.integration
def test_real_server_judgements_are_what_it_answered_and_are_cached(llama_server, tmp_path):
    from bench.judges.base import CONCEPT_PROMPT, FLUENCY_PROMPT, UNPARSABLE, Judgement

    judge = real_judge(llama_server, tmp_path)
    concept = judge.concept(TEXTS, "animals", baseline=[])
    fluency = judge.fluency(TEXTS, "Write one sentence.")

    prompts = [CONCEPT_PROMPT.format(description="animals", text=t) for t in TEXTS]
    prompts += [FLUENCY_PROMPT.format(prompt="Write one sentence.", text=t) for t in TEXTS]
    answers = [recorded_answer(judge, p, judge.max_answer_tokens) for p in prompts]
    unparsable = 0
    for judgement, answer in zip(concept + fluency, answers, strict=True):
        assert answer.strip(), "the server answered with no text"
        found = RATING.findall(answer)
        if found:
            assert judgement == Judgement(float(found[-1])), (answer, judgement)
        else:
            unparsable += 1
            assert judgement.score is None and judgement.reason.startswith(UNPARSABLE)
            assert " ".join(answer.split())[:40] in judgement.reason  # it quotes the answer
    stats = judge.stats()
    assert stats["unparsable"] == unparsable  # counted exactly
    assert stats["requests"] == 4 and stats["failed_requests"] == 0  # the server answered every one
    assert stats["prompt_tokens"] > 4 * 50 and stats["completion_tokens"] >= 4
    assert stats["cost_usd"] > 0

    again = judge.concept(TEXTS, "animals", baseline=[]) + judge.fluency(
        TEXTS, "Write one sentence."
    )
    assert again == concept + fluency
    assert judge.stats()["cache_hits"] == stats["cache_hits"] + 4
    assert judge.stats()["requests"] == stats["requests"]

    contexts = ["the [[cat]] sat on the mat", "a [[dog]] barked at night"]
    description = judge.describe(contexts)
    assert description and description in " ".join(
        recorded_answer(judge, describe_prompt(contexts), 24).split()
    )
    assert judge.stats()["requests"] == stats["requests"] + 1


#: asked for the format outright, the 135M model writes "Rating: [2]" (greedy): a known
#: answer, one bracket short of the format
NEAR_MISS = 'Answer with the text "Rating: [[2]]" only.'


@pytest.mark.integration
def test_real_server_near_miss_is_missing_with_its_answer(llama_server, tmp_path):
    """A crafted prompt with a known raw answer, over HTTP and through `_rate`: the answer
    arrives and is recorded, is not taken for a 2, and is counted."""
    from bench.judges.base import UNPARSABLE

    judge = real_judge(llama_server, tmp_path)
    (judgement,) = judge._rate([NEAR_MISS])
    answer = recorded_answer(judge, NEAR_MISS, judge.max_answer_tokens)
    assert "Rating: [2]" in answer and not RATING.search(answer), answer
    assert judgement.score is None and judgement.reason.startswith(UNPARSABLE)
    assert "Rating: [2]" in judgement.reason
    assert (judge.stats()["unparsable"], judge.stats()["failed_requests"]) == (1, 0)

"""The `openai` judge: the rubric of `ChatJudge` over any OpenAI-compatible endpoint.

Each prompt is one POST to `{base_url}/chat/completions` (standard-library
HTTP, no SDK) at temperature 0. Around that request:

- the API key is read from the environment variable named by `api_key_env`
  when a batch of requests starts and lives only in local variables: it is
  never an attribute, so it never reaches a repr, a serialized object, a log or an error
  message. The variable is also checked when the judge is built, so a missing
  key fails with a `ConfigError` before any model is loaded, not hours into
  a sweep. `api_key_env: null` sends no key (a loopback server without auth);
- connection errors, timeouts, HTTP 429 and 5xx are retried with exponential
  backoff; other 4xx and malformed responses are not (retrying cannot help);
- successful answers are cached on disk, one JSON file per (endpoint, model,
  prompt, max_tokens, temperature, attempt), so re-running a sweep does not pay
  twice. The attempt is part of the key from the second on: a re-ask after a
  failed rating, or another sentence asked with the same prompt, is a new request,
  never the cached first answer, and a rerun replays each attempt from disk;
- usage tokens and their cost are summed for `stats()`.

A request that still fails comes back as its exception, which `ChatJudge`
turns into a missing judgement with the reason; one warning is logged per
kind of failure, the rest are counted in `stats()`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from bench.core.secrets import redact_text
from bench.core.storage import atomic_write_text, cache_dir, sha256_json
from bench.errors import ConfigError, JudgeUnreachable
from bench.judges.base import UNPARSABLE, ChatJudge, Judgement

log = logging.getLogger(__name__)

TEMPERATURE = 0.0  # ratings must be reproducible: greedy decoding, part of the cache key
MAX_RETRY_AFTER = 60.0  # seconds: the most a server's Retry-After header can make us wait


@dataclass(frozen=True)
class _Key:
    """What, besides endpoint, model and prompt, makes two requests different."""

    max_tokens: int
    temperature: float = TEMPERATURE  # ratings at 0; writing at the judge's write_temperature
    attempt: int = 1  # > 1: a new request for a prompt already asked (part of the cache key)


class RequestFailed(RuntimeError):
    """One chat request that failed; `kind` groups failures for logging and stats."""

    def __init__(self, kind: str, detail: str, retryable: bool, retry_after: float | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.retryable, self.retry_after = kind, retryable, retry_after


@dataclass
class OpenAIJudge(ChatJudge):
    """Scores texts with a chat model behind an OpenAI-compatible HTTP API."""

    name: ClassVar[str] = "openai"

    base_url: str = "https://api.openai.com/v1"  # OpenAI itself; any compatible server works
    model: str = "gpt-4o-mini"  # cheap and good enough for 0-2 rubric ratings
    api_key_env: str | None = "OPENAI_API_KEY"  # NAME of the variable holding the key; null: none
    timeout: float = 60.0  # seconds per socket operation: long answers on a busy API take ~10 s
    max_retries: int = 5  # with backoff 1 s: waits 1+2+4+8+16 s, enough to ride out a rate limit
    backoff: float = 1.0  # seconds before the first retry, doubled for each further one
    concurrency: int = 8  # parallel requests: fast on hosted APIs, below common rate limits
    cache_dir: str | None = None  # null: $FEATBENCH_CACHE/judge, shared by every run
    cache: bool = True  # off only for endpoints whose answers change at temperature 0
    price_input_per_m: float = 0.15  # USD per 1M prompt tokens (gpt-4o-mini list price)
    price_output_per_m: float = 0.60  # USD per 1M completion tokens (gpt-4o-mini list price)
    write_temperature: float = 1.0  # descriptions and sentences: the API default the SNMF code uses

    _counts: dict[str, float] = field(init=False, repr=False, default_factory=dict)
    _warned: set[str] = field(init=False, repr=False, default_factory=set)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge.base_url={self.base_url!r} must start with http(s)://")
        if self.write_temperature < 0:
            raise ConfigError(f"judge.write_temperature={self.write_temperature}: must be >= 0")
        if self.timeout <= 0 or self.concurrency < 1 or self.max_retries < 0 or self.backoff < 0:
            raise ConfigError(
                "judge.timeout must be > 0, judge.concurrency >= 1, judge.max_retries and "
                f"judge.backoff >= 0 (got {self.timeout}, {self.concurrency}, "
                f"{self.max_retries}, {self.backoff})"
            )
        self.base_url = self.base_url.rstrip("/")
        counters = ("requests", "retries", "cache_hits", "failed_requests", "unparsable", "reasked")
        self._counts = dict.fromkeys((*counters, "prompt_tokens", "completion_tokens"), 0)
        self._api_key()  # fail now, before any generation, if the variable is missing

    # --- the ChatJudge contract ---------------------------------------------

    def complete(
        self,
        prompts: list[str],
        max_tokens: int,
        temperature: float = TEMPERATURE,
        attempt: int = 1,
    ) -> list[str | Exception]:
        api_key = self._api_key()
        key = _Key(max_tokens, temperature, attempt)
        answers: list[str | Exception | None] = [None] * len(prompts)
        todo = []
        for i, prompt in enumerate(prompts):
            cached = self._cache_get(prompt, key)
            if cached is None:
                todo.append(i)
            else:
                answers[i] = cached
                self._add("cache_hits", 1)
        if todo:
            workers = min(self.concurrency, len(todo))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
                done = pool.map(lambda i: self._ask(prompts[i], key, api_key), todo)
                for i, answer in zip(todo, done, strict=True):
                    answers[i] = answer
        return answers  # type: ignore[return-value]

    def label(self) -> str:
        return f"openai {self.model} @ {self.base_url}"

    def check_reachable(self) -> None:
        """One cheap request, `GET {base_url}/models`, before any model loads: a server that
        refuses connections, does not answer, or refuses the key fails the job now with the
        URL named, not after hours of generation with every judgement missing. A server
        that answers anything else (a 404 from one without that route) is reachable."""
        api_key = self._api_key()
        url = f"{self.base_url}/models"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        where = redact_text(url)
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=min(self.timeout, 10.0)
            ):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise JudgeUnreachable(
                    f"the judge endpoint {where} refused the key (HTTP {exc.code}); check "
                    f"${self.api_key_env}"
                ) from None
            return  # it answered: some compatible servers have no /models route
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            detail = _redact(f"{type(reason).__name__}: {reason}", api_key)
            raise JudgeUnreachable(
                f"the judge endpoint {where} cannot be reached ({redact_text(detail)}); start "
                "the server or fix judge.base_url, or choose judge=offline"
            ) from None

    def _rate(self, prompts: list[str]) -> list[Judgement]:
        judgements = super()._rate(prompts)  # counts the unparsable ones
        for judgement in judgements:
            if judgement.reason and judgement.reason.startswith(UNPARSABLE):
                self._warn_once("unparsable", judgement.reason)
                break
        return judgements

    def _count(self, counter: str, amount: float) -> None:
        self._add(counter, amount)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = dict(self._counts)
        out["cost_usd"] = (
            out["prompt_tokens"] * self.price_input_per_m
            + out["completion_tokens"] * self.price_output_per_m
        ) / 1e6
        return out

    # --- one request, with retries --------------------------------------------

    def _ask(self, prompt: str, key: _Key, api_key: str | None) -> str | Exception:
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._add("retries", 1)
            self._add("requests", 1)
            try:
                answer, prompt_tokens, completion_tokens = self._post(prompt, key, api_key)
            except RequestFailed as exc:
                if not exc.retryable or attempt == self.max_retries:
                    self._add("failed_requests", 1)
                    self._warn_once(exc.kind, str(exc))
                    return exc
                delay = self.backoff * 2**attempt
                time.sleep(max(delay, min(exc.retry_after or 0.0, MAX_RETRY_AFTER)))
                continue
            self._add("prompt_tokens", prompt_tokens)
            self._add("completion_tokens", completion_tokens)
            if self.cache:
                self._cache_put(prompt, key, answer)
            return answer
        raise AssertionError("unreachable")  # the last attempt always returns

    def _post(self, prompt: str, key: _Key, api_key: str | None) -> tuple[str, int, int]:
        """The answer and its prompt and completion tokens (0 where the server reports none)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": key.temperature,
            "max_tokens": key.max_tokens,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", json.dumps(body).encode(), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = _redact(_snippet(exc.read()), api_key)
            except (OSError, http.client.HTTPException):
                detail = "(no readable body)"
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            retryable = exc.code == 429 or exc.code >= 500
            raise RequestFailed(
                f"HTTP {exc.code}", detail, retryable, _seconds(retry_after)
            ) from None
        except TimeoutError:
            raise RequestFailed("timeout", f"no answer within {self.timeout:g} s", True) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise RequestFailed(
                    "timeout", f"no answer within {self.timeout:g} s", True
                ) from None
            detail = _redact(f"{type(reason).__name__}: {reason}", api_key)
            raise RequestFailed("connection error", detail, True) from None
        try:
            data = json.loads(raw)
            answer = data["choices"][0]["message"]["content"]
            if not isinstance(answer, str):
                raise TypeError("message content is not a string")
            usage = data.get("usage") or {}
            tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            detail = _redact(f"{type(exc).__name__}: {exc}; body {_snippet(raw)}", api_key)
            raise RequestFailed("invalid response", detail, False) from None
        return answer, *tokens

    # --- helpers -------------------------------------------------------------

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"the openai judge reads its API key from ${self.api_key_env}, which is not set; "
                "export it, or set judge.api_key_env=null for a server without auth"
            )
        return key

    def _cache_path(self, prompt: str, key: _Key | int) -> Path:
        """The cache file of `prompt` (`key`: a _Key, or max_tokens for a first rating)."""
        digest = sha256_json(self._cache_key(prompt, key))
        root = Path(self.cache_dir).expanduser() if self.cache_dir else cache_dir() / "judge"
        return root / digest[:2] / f"{digest}.json"

    def _cache_key(self, prompt: str, key: _Key | int) -> dict[str, Any]:
        key = key if isinstance(key, _Key) else _Key(key)
        entry = {
            "endpoint": self.base_url,
            "model": self.model,
            "prompt": prompt,
            "max_tokens": key.max_tokens,
            "temperature": key.temperature,
        }
        if key.attempt > 1:  # a first attempt keeps the key it always had
            entry["attempt"] = key.attempt
        return entry

    def _cache_get(self, prompt: str, key: _Key) -> str | None:
        if not self.cache:
            return None
        path = self._cache_path(prompt, key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._warn_once("cache", f"unreadable judge cache entry {path} ({exc}); asking again")
            return None
        if entry.get("key") != self._cache_key(prompt, key):
            return None  # a hash collision or a foreign file: ask again
        return entry.get("answer")

    def _cache_put(self, prompt: str, key: _Key, answer: str) -> None:
        entry = {"key": self._cache_key(prompt, key), "answer": answer}
        try:
            atomic_write_text(self._cache_path(prompt, key), json.dumps(entry))
        except OSError as exc:  # a full or read-only disk costs a re-ask later, not the answer
            self._warn_once("cache", f"could not write the judge cache ({exc})")

    def _add(self, counter: str, amount: float) -> None:
        with self._lock:
            self._counts[counter] += amount

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            first = kind not in self._warned
            self._warned.add(kind)
        if first:
            log.warning(
                "openai judge (%s at %s): %s; further failures of this kind are only counted "
                "in stats()",
                self.model,
                self.base_url,
                message,
            )


def _snippet(raw: bytes) -> str:
    return repr(" ".join(raw.decode("utf-8", "replace").split())[:120])


def _redact(text: str, api_key: str | None) -> str:
    """A server may echo what it received; never let the key into a message."""
    return text.replace(api_key, "***") if api_key else text


def _seconds(header: str | None) -> float | None:
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff

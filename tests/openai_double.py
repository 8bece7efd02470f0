"""The one loopback OpenAI-compatible TEST DOUBLE, for wiring only (never evidence of
quality: its answers are ours).

`serving(script)` starts it on 127.0.0.1 and yields it; request n (0-based) is answered by
`script(n, record)` with (status, raw body), where `record` holds the request's `path`,
`headers` and, for a POST, its JSON `body`; every request is recorded in `requests`.
`answering(answer)` makes a script of `answer(n, prompt, body) -> text | (status, raw
body)`, and `fixed_answer` is the paper protocol's: a valid answer of each kind, chosen by
what the prompt asks for (a rating, an input- or output-centric description, an activating
or a neutral sentence). GET `/models` (the judge's reachability check) is scripted too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.judges.openai import OpenAIJudge

Reply = tuple[int, bytes]  # status, body
Script = Callable[[int, dict], Reply]
Answer = Callable[[int, str, dict], "str | Reply"]


def chat_reply(content: str, prompt_tokens: int = 100, completion_tokens: int = 10) -> Reply:
    """A chat completion answering `content`, with its token usage."""
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    return 200, json.dumps(body).encode()


def fixed_answer(n: int, prompt: str, body: dict) -> str:
    """Valid answers of each kind. Sentences carry the request number, so every one is new."""
    if "Rating: [[n]]" in prompt:
        return "The text is on topic and reads well. Rating: [[2]]"
    if "Connection:" in prompt:  # an output-centric description
        return "Analysis: the tokens are about cooking.\nResults:\n- Connection: cooking and food."
    if "Results:" in prompt:  # an input-centric description
        return "Analysis: the strongest tokens name foods.\nResults: Food and cooking."
    if "unrelated topic" in prompt:
        return f"The train left the station at {n} o'clock."
    if "respond to" in prompt:
        return f"She baked {n} loaves of bread with fresh butter."
    return "I do not know."


def answering(answer: Answer = fixed_answer) -> Script:
    """A script that answers each chat request with `answer(n, prompt, body)` (a text, or
    (status, raw body) for a fault) and every GET with an empty model list."""

    def script(n: int, record: dict) -> Reply:
        if "body" not in record:
            return 200, b'{"data": []}'
        body = record["body"]
        reply = answer(n, body["messages"][0]["content"], body)
        return reply if isinstance(reply, tuple) else chat_reply(reply)

    return script


class OpenAIDouble(ThreadingHTTPServer):
    """Answers request n with `script(n, record)`; records every request."""

    def __init__(self, script: Script):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script, self.requests, self.lock = script, [], threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        """The chat requests' prompts, in order."""
        return [r["body"]["messages"][0]["content"] for r in self.requests if "body" in r]

    def handle_error(self, request, client_address) -> None:  # a client that timed out
        pass


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIDouble

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})

    def do_GET(self) -> None:  # the reachability check's `GET /models`
        self._answer({"path": self.path, "headers": dict(self.headers)})

    def _answer(self, record: dict) -> None:
        with self.server.lock:
            n = len(self.server.requests)
            self.server.requests.append(record)
        status, payload = self.server.script(n, record)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serving(script: Script | None = None) -> Iterator[OpenAIDouble]:
    """The double on a free loopback port, answering with `script` (default: the paper
    protocol's fixed answers), stopped at the end of the block."""
    server = OpenAIDouble(script or answering(fixed_answer))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def double_judge(server: OpenAIDouble, cache_dir: Path, **kwargs) -> OpenAIJudge:
    """featbench's OpenAI judge pointed at the double: no key, no retries."""
    return OpenAIJudge(
        base_url=server.url,
        model="double",
        api_key_env=None,
        max_retries=0,
        cache_dir=str(cache_dir),
        **kwargs,
    )

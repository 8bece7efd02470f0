"""A loopback OpenAI-compatible TEST DOUBLE for the paper protocol's wiring.

It answers every chat request with a fixed, valid answer chosen by what the prompt asks
for (a rating, an input- or output-centric description, an activating or a neutral
sentence). It is a test double for wiring only: its answers are ours, so a run against
it shows that the pieces connect and count as they should, never anything about quality.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Answer = Callable[[int, str, dict], "str | tuple[int, bytes]"]


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


class OpenAIDouble(ThreadingHTTPServer):
    """Serves POST /v1/chat/completions on 127.0.0.1 with `answer(n, prompt, body)`
    (a text, or (status, raw body) for a fault); records every request."""

    def __init__(self, answer: Answer = fixed_answer):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer, self.requests, self.lock = answer, [], threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        return [r["messages"][0]["content"] for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIDouble

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            n = len(self.server.requests)
            self.server.requests.append(body)
        answer = self.server.answer(n, body["messages"][0]["content"], body)
        if isinstance(answer, tuple):
            status, payload = answer
        else:
            status = 200
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}],
                                  "usage": {"prompt_tokens": 10, "completion_tokens": 5}}).encode()  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serving(answer: Answer = fixed_answer) -> Iterator[OpenAIDouble]:
    server = OpenAIDouble(answer)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()

"""The judge contract: score generated text for concept presence and fluency.

Both scales are 0-2, as in AxBench and the SNMF paper:
concept 0 = absent, 1 = somewhat present, 2 = clearly present;
fluency 0 = not fluent, 1 = somewhat fluent, 2 = fluent.

A judgement that fails (network error, unparsable answer, empty text) is a
`Judgement(None, reason)`: a missing value with its reason, never a 0. The
steering task counts these in a `judge_failures` summary row.

`ChatJudge` is the shared half of the LLM judges (`openai`, `hf_chat`): the
rubric prompts, the `Rating: [[n]]` parser and the description prompt. A
subclass only implements `complete(prompts) -> answers`, one answer or one
exception per prompt.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger(__name__)

SCALE = (0.0, 1.0, 2.0)

#: what a description can be: a concept name ("law enforcement"); a writing judge's
#: one-line summary of a feature's top contexts; its top-activating train tokens as a
#: comma-separated list ("goal, match, score"); the tokens a direction promotes through
#: the unembedding, one list per sign
DESCRIPTION_KINDS = ("label", "summary", "tokens", "output_centric")
UNPARSABLE = "unparsable judge answer"  # how the reason of an unparsable answer starts


@dataclass(frozen=True)
class Judgement:
    """One score on the 0-2 scale, or None with the reason it is missing."""

    score: float | None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.score is None and not self.reason:
            raise ValueError("a missing judgement needs a reason")
        if self.score is not None and not 0.0 <= self.score <= 2.0:
            raise ValueError(f"judgement score {self.score} outside the 0-2 scale")


class Judge(ABC):
    """Scores texts. Subclasses are dataclasses of their config (`conf/judge/*.yaml`)."""

    #: value of the `judge` column (None: the class name in lower case)
    name: ClassVar[str | None] = None
    #: whether `describe` can summarize top-activating contexts into a description
    can_write: ClassVar[bool] = False

    def bind(self, model: Any) -> None:  # noqa: B027 - optional hook, default no-op
        """Receive the unsteered language model (a HookedTransformer) before judging.

        The offline judge scores fluency with it; LLM judges ignore it.
        """

    @abstractmethod
    def concept(
        self, texts: list[str], description: str, baseline: list[str], kind: str | None = None
    ) -> list[Judgement]:
        """How clearly each text shows the concept `description` (0-2).

        `baseline` are unsteered generations from the same prompts: judges that
        score relative to what the model writes anyway use them. `kind` is the
        description's kind (`DESCRIPTION_KINDS`; None: a concept label): a judge
        calibrated per kind (offline) picks its thresholds by it, LLM judges
        read the description as it is and ignore it.
        """

    @abstractmethod
    def fluency(self, texts: list[str], prompt: str) -> list[Judgement]:
        """How fluent each text is as a continuation of `prompt` (0-2)."""

    def describe(self, contexts: list[str]) -> str | None:
        """A short description of what the contexts share (only when `can_write`)."""
        return None

    def stats(self) -> dict[str, float]:
        """Counters worth a results row (requests, tokens, cost, cache hits)."""
        return {}


# --- LLM judges -------------------------------------------------------------

CONCEPT_PROMPT = """Please act as an impartial judge. Rate how clearly the concept below appears in the text fragment.

Concept: {description}

Text fragment: {text}

Scale:
0 - the concept is absent.
1 - the concept is somewhat present, or only loosely related.
2 - the concept is clearly present.

Answer with one short sentence of reasoning, then the rating exactly in the form "Rating: [[n]]" with n being 0, 1 or 2."""

FLUENCY_PROMPT = """Please act as an impartial judge. Rate the fluency of the text fragment, which continues the prompt below. Judge only grammar and coherence, not content or style.

Prompt: {prompt}

Text fragment: {text}

Scale:
0 - not fluent: broken, repetitive or incoherent.
1 - somewhat fluent: understandable with noticeable errors or repetition.
2 - fluent: reads like natural text.

Answer with one short sentence of reasoning, then the rating exactly in the form "Rating: [[n]]" with n being 0, 1 or 2."""

DESCRIBE_PROMPT = """Here are text snippets where one feature of a language model is active; the strongest token is marked [[like this]].

{contexts}

In at most eight words, what concept do these snippets share? Answer with the concept only."""

_RATING = re.compile(r"Rating:\s*\[\[\s*([0-2])\s*\]\]")


def parse_rating(answer: str) -> Judgement:
    """The last `Rating: [[n]]` in an answer; anything else is a missing value."""
    found = _RATING.findall(answer or "")
    if not found:
        snippet = " ".join((answer or "").split())[:80]
        return Judgement(None, f"{UNPARSABLE} (no 'Rating: [[n]]'): {snippet!r}")
    return Judgement(float(found[-1]))


class ChatJudge(Judge):
    """Rubric prompts over a chat model; subclasses implement `complete`."""

    can_write: ClassVar[bool] = True

    @abstractmethod
    def complete(self, prompts: list[str], max_tokens: int) -> list[str | Exception]:
        """One chat answer per prompt (user message), or the exception that prevented it."""

    @abstractmethod
    def _count(self, counter: str, amount: float) -> None:
        """Add `amount` to the `stats()` counter `counter`."""

    def _rate(self, prompts: list[str]) -> list[Judgement]:
        """Ask and parse; every unparsable answer is counted in `stats()["unparsable"]`."""
        out = []
        for answer in self.complete(prompts, max_tokens=self.max_answer_tokens):
            if isinstance(answer, Exception):
                out.append(
                    Judgement(None, f"judge request failed: {type(answer).__name__}: {answer}")
                )
            else:
                out.append(parse_rating(answer))
        unparsable = sum(bool(j.reason and j.reason.startswith(UNPARSABLE)) for j in out)
        if unparsable:
            self._count("unparsable", unparsable)
        return out

    #: enough for one sentence of reasoning and the rating
    max_answer_tokens: ClassVar[int] = 96

    def concept(
        self, texts: list[str], description: str, baseline: list[str], kind: str | None = None
    ) -> list[Judgement]:
        # the rubric reads the description as written, whatever its kind
        return self._rate_texts(
            texts, lambda text: CONCEPT_PROMPT.format(description=description, text=text)
        )

    def fluency(self, texts: list[str], prompt: str) -> list[Judgement]:
        return self._rate_texts(texts, lambda text: FLUENCY_PROMPT.format(prompt=prompt, text=text))

    def _rate_texts(self, texts: list[str], make_prompt: Any) -> list[Judgement]:
        """Rate each non-empty text with its prompt; an empty text is missing, unasked."""
        results: list[Judgement] = [Judgement(None, "empty text")] * len(texts)
        where = [i for i, text in enumerate(texts) if text.strip()]
        rated = self._rate([make_prompt(texts[i]) for i in where])
        for i, judgement in zip(where, rated, strict=True):
            results[i] = judgement
        return results

    def describe(self, contexts: list[str]) -> str | None:
        if not contexts:
            return None
        listing = "\n".join(f"- {c.strip()}" for c in contexts)
        (answer,) = self.complete([DESCRIBE_PROMPT.format(contexts=listing)], max_tokens=24)
        if isinstance(answer, Exception):
            log.warning("judge could not describe a feature (%s); using its top tokens", answer)
            return None
        text = " ".join(answer.split()).strip(" .\"'")
        return text or None

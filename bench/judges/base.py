"""The judge contract: score generated text for concept presence and fluency.

Both scales are 0-2, as in AxBench and the SNMF paper:
concept 0 = absent, 1 = somewhat present, 2 = clearly present;
fluency 0 = not fluent, 1 = somewhat fluent, 2 = fluent.

A judgement that fails (network error, unparsable answer, empty text) is a
`Judgement(None, reason)`: a missing value with its reason, never a 0. The
steering task counts these in a `judge_failures` summary row.

`ChatJudge` is the shared half of the LLM judges (`openai`, `hf_chat`): the
rubric prompts, the `Rating: [[n]]` parser and the description prompt. A
subclass only implements `complete(prompts, max_tokens, temperature, attempt)
-> answers`, one answer or one exception per prompt.

Rating policy: `judge.with_policy(attempts, rating_format)` is the same judge asking
each rating up to `attempts` times (the SNMF reference asks twice): attempt k > 1
re-asks only the prompts whose earlier answer failed (request error or no rating),
and is never answered from the cached answer of an earlier attempt (the openai
judge keys its cache by attempt too, so a rerun replays every attempt from disk).
`rating_format` is how an answer's rating is read (RATING_FORMATS): `strict`, the
last `Rating: [[n]]` with n in 0-2 (featbench's), or `reference`, the first
`Rating: [[n]]` or bare `Rating: n` (the reference's parser; a value outside 0-2,
which the reference would keep, is unparsable here).

Writing: a judge that `can_write` also answers free-form prompts (`write`), at
`write_temperature`, for the feature descriptions and the concept-detection
sentences of the paper protocol (`bench/judges/writing.py`).
"""

from __future__ import annotations

import copy
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

log = logging.getLogger(__name__)

SCALE = (0.0, 1.0, 2.0)

#: what a description can be: a concept name ("law enforcement"); a writing judge's
#: one-line summary of a feature's top contexts; its top-activating train tokens as a
#: comma-separated list ("goal, match, score"); the tokens a direction promotes through
#: the unembedding, one list per sign; the SNMF paper's two written descriptions (of the
#: top train tokens in context; of the promoted tokens, per sign)
DESCRIPTION_KINDS = (
    "label",
    "summary",
    "tokens",
    "output_centric",
    "input_centric",
    "output_summary",
)
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
        self,
        texts: list[str],
        description: str,
        baseline: list[str],
        kind: str | None = None,
        examples: Sequence[str] | None = None,
    ) -> list[Judgement]:
        """How clearly each text shows the concept `description` (0-2).

        `baseline` are unsteered generations from the same prompts: judges that
        score relative to what the model writes anyway use them. `kind` is the
        description's kind (`DESCRIPTION_KINDS`; None: a concept label): a judge
        calibrated per kind (offline) picks its thresholds by it, LLM judges
        read the description as it is and ignore it. `examples`: sentences of the
        concept, when the protocol has them (the concept-paired protocol passes a
        concept's train sentences); the offline judge compares with their centroid,
        LLM judges read the description.
        """

    @abstractmethod
    def fluency(self, texts: list[str], prompt: str) -> list[Judgement]:
        """How fluent each text is as a continuation of `prompt` (0-2)."""

    def prepare(self, texts: list[str]) -> None:  # noqa: B027 - optional hook, default no-op
        """The texts about to be judged, all at once, before the per-description calls: a
        judge that can batch work on them (the offline judge embeds them) does it here."""

    def describe(self, contexts: list[str]) -> str | None:
        """A short description of what the contexts share (only when `can_write`)."""
        return None

    def write(self, prompt: str, max_tokens: int, attempt: int = 1) -> str | Exception:
        """A free-form answer to `prompt` (only when `can_write`): `attempt` > 1 asks again
        rather than replaying an earlier answer."""
        return NotImplementedError(f"judge {self.label()} cannot write")

    def with_policy(self, attempts: int = 1, rating_format: str = "strict") -> Judge:
        """This judge asking each rating up to `attempts` times and reading ratings in
        `rating_format`. Judges whose answers cannot fail to parse (offline) are
        returned as they are."""
        return self

    def check_reachable(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Raise `JudgeUnreachable` if the judge cannot answer at all (a server that is down,
        a key it refuses); called once per job before the model loads. Judges that run in
        this process have nothing to reach."""

    def label(self) -> str:
        """How rows and reports name this judge (e.g. `openai gpt-4o-mini @ <url>`)."""
        return type(self).name or type(self).__name__.lower()

    def stats(self) -> dict[str, float]:
        """Counters worth a results row (requests, tokens, cost, cache hits)."""
        return {}


# --- LLM judges -------------------------------------------------------------

# Every rating prompt ends with the same instruction, and both fluency prompts share
# their scale; the prompts are composed from these so the wording cannot drift apart.
ANSWER = 'Answer with one short sentence of reasoning, then the rating exactly in the form "Rating: [[n]]" with n being 0, 1 or 2.'

FLUENCY_SCALE = """Scale:
0 - not fluent: broken, repetitive or incoherent.
1 - somewhat fluent: understandable with noticeable errors or repetition.
2 - fluent: reads like natural text."""

CONCEPT_PROMPT = (
    """Please act as an impartial judge. Rate how clearly the concept below appears in the text fragment.

Concept: {description}

Text fragment: {text}

Scale:
0 - the concept is absent.
1 - the concept is somewhat present, or only loosely related.
2 - the concept is clearly present.

"""
    + ANSWER
)

FLUENCY_PROMPT = (
    """Please act as an impartial judge. Rate the fluency of the text fragment, which continues the prompt below. Judge only grammar and coherence, not content or style.

Prompt: {prompt}

Text fragment: {text}

"""
    + FLUENCY_SCALE
    + "\n\n"
    + ANSWER
)

#: FLUENCY_PROMPT for a text that already holds its prompt (the reference's judged text)
FLUENCY_TEXT_ONLY_PROMPT = (
    """Please act as an impartial judge. Rate the fluency of the text fragment below. Judge only grammar and coherence, not content, style or whether it is complete.

Text fragment: {text}

"""
    + FLUENCY_SCALE
    + "\n\n"
    + ANSWER
)

DESCRIBE_PROMPT = """Here are text snippets where one feature of a language model is active; the strongest token is marked [[like this]].

{contexts}

In at most eight words, what concept do these snippets share? Answer with the concept only."""

_RATING = re.compile(r"Rating:\s*\[\[\s*([0-2])\s*\]\]")
_REFERENCE_RATING = re.compile(r"Rating:\s*(?:\[\[(\d+)\]\]|(\d+))")
RATING_FORMATS = ("strict", "reference")


def parse_rating(answer: str, rating_format: str = "strict") -> Judgement:
    """`strict`: the last `Rating: [[n]]` in an answer (n in 0-2). `reference`: the first
    `Rating: [[n]]` or `Rating: n`, as the SNMF reference parses. Anything else is a
    missing value with the answer quoted."""
    snippet = " ".join((answer or "").split())[:80]
    if rating_format == "reference":
        found = _REFERENCE_RATING.search(answer or "")
        if not found:
            return Judgement(None, f"{UNPARSABLE} (no 'Rating: n'): {snippet!r}")
        value = int(found.group(1) or found.group(2))
        if value > 2:
            return Judgement(None, f"{UNPARSABLE} (rating {value} outside 0-2): {snippet!r}")
        return Judgement(float(value))
    found = _RATING.findall(answer or "")
    if not found:
        return Judgement(None, f"{UNPARSABLE} (no 'Rating: [[n]]'): {snippet!r}")
    return Judgement(float(found[-1]))


class ChatJudge(Judge):
    """Rubric prompts over a chat model; subclasses implement `complete`.

    `with_policy` sets `attempts` and `rating_format` on a shallow copy that shares the
    counters, the cache and any loaded model."""

    can_write: ClassVar[bool] = True
    #: tries per rating (`with_policy`); 1 = ask once, a failure stays a failure
    attempts: int = 1
    #: how ratings are read (RATING_FORMATS; `with_policy`)
    rating_format: str = "strict"
    #: temperature of `write` (descriptions, sentences): the API's default, which the
    #: SNMF reference leaves in place for both; ratings are always at temperature 0
    write_temperature: float = 1.0

    @abstractmethod
    def complete(
        self, prompts: list[str], max_tokens: int, temperature: float = 0.0, attempt: int = 1
    ) -> list[str | Exception]:
        """One chat answer per prompt (user message), or the exception that prevented it.
        `attempt` > 1 must not replay the answer of an earlier attempt."""

    @abstractmethod
    def _count(self, counter: str, amount: float) -> None:
        """Add `amount` to the `stats()` counter `counter`."""

    def with_policy(self, attempts: int = 1, rating_format: str = "strict") -> ChatJudge:
        if attempts < 1 or rating_format not in RATING_FORMATS:
            raise ValueError(
                f"attempts={attempts}, rating_format={rating_format!r}: need attempts >= 1 "
                f"and a format in {list(RATING_FORMATS)}"
            )
        if (attempts, rating_format) == (self.attempts, self.rating_format):
            return self
        twin = copy.copy(self)  # shares the counters, the cache and any loaded model
        twin.attempts, twin.rating_format = attempts, rating_format
        return twin

    def _rate(self, prompts: list[str]) -> list[Judgement]:
        """Ask and parse, re-asking failures up to `attempts` times; every unparsable
        answer (each attempt's) is counted in `stats()["unparsable"]`."""
        out: list[Judgement] = [Judgement(None, "not asked")] * len(prompts)
        todo = list(range(len(prompts)))
        for attempt in range(1, self.attempts + 1):
            if not todo:
                break
            if attempt > 1:
                self._count("reasked", len(todo))
            asked = [prompts[i] for i in todo]
            answers = (
                self.complete(asked, self.max_answer_tokens)
                if attempt == 1
                else self.complete(asked, self.max_answer_tokens, attempt=attempt)
            )
            for i, answer in zip(todo, answers, strict=True):
                if isinstance(answer, Exception):
                    why = f"judge request failed: {type(answer).__name__}: {answer}"
                    out[i] = Judgement(None, why)
                else:
                    out[i] = parse_rating(answer, self.rating_format)
            unparsable = sum(
                bool(out[i].reason and out[i].reason.startswith(UNPARSABLE)) for i in todo
            )
            if unparsable:
                self._count("unparsable", unparsable)
            todo = [i for i in todo if out[i].score is None]
        if self.attempts > 1:
            for i in todo:
                out[i] = Judgement(None, f"{out[i].reason} (after {self.attempts} attempts)")
        return out

    #: enough for one sentence of reasoning and the rating
    max_answer_tokens: ClassVar[int] = 96

    def concept(
        self,
        texts: list[str],
        description: str,
        baseline: list[str],
        kind: str | None = None,
        examples: Sequence[str] | None = None,
    ) -> list[Judgement]:
        # the rubric reads the description as written, whatever its kind or examples
        return self._rate_texts(
            texts, lambda text: CONCEPT_PROMPT.format(description=description, text=text)
        )

    def fluency(self, texts: list[str], prompt: str) -> list[Judgement]:
        if not prompt:  # the text holds its own prompt
            return self._rate_texts(texts, lambda text: FLUENCY_TEXT_ONLY_PROMPT.format(text=text))
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

    def write(self, prompt: str, max_tokens: int, attempt: int = 1) -> str | Exception:
        (answer,) = self.complete(
            [prompt], max_tokens, temperature=self.write_temperature, attempt=attempt
        )
        return answer

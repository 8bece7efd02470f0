"""What a writing judge is asked to write for the SNMF paper's protocol, and how its
answers are read: feature descriptions (input- and output-centric) and the sentences
of concept detection.

The wording is featbench's own. What follows the reference code (github
ordavid-s/snmf-mlp-decomposition at ab58c78, see docs/paper-protocol.md) is the
shape: the inputs listed (tokens with their context and score; promoted tokens with
their score), the answer format (an `Analysis:` section, then a `Results:` section
holding one sentence; `TRASH` there when promoted tokens share nothing), the answer
lengths, and for sentences one sentence per request, listing the ones written so far.
"""

from __future__ import annotations

import re

#: answer lengths of the reference: input-centric descriptions, output-centric ones,
#: one generated sentence
INPUT_TOKENS, OUTPUT_TOKENS, SENTENCE_TOKENS = 200, 5000, 100
TRASH = "TRASH"  # the output-centric answer for "no connection" (case-sensitive, as the reference)

INPUT_DESCRIBE = """Below are the tokens on which one feature of a language model is most active, strongest first. Each line gives the token, the text around it (up to 15 tokens on either side, same sentence) and the feature's activation there.

{lines}

What do these tokens have in common? Weigh the strongest ones most. If the tokens themselves already share a meaning, describe that; otherwise use their contexts. Prefer the simplest description that covers them.

Write your answer in two sections:
Analysis: a few sentences of reasoning.
Results: one sentence describing the feature."""

OUTPUT_DESCRIBE = """Below are the tokens that one direction in a language model pushes up most when it is added to the model's computation, strongest first, each with its score.

{lines}

What connects these tokens? Weigh the highest scores most and ignore tokens that look like noise. Be precise and specific. If nothing connects them, write TRASH as the result.

Write plain text, no markdown, in two sections:
Analysis: a few sentences of reasoning.
Results:
- Connection: one sentence describing the connection (or TRASH)."""

ACTIVATING = """A feature of a language model is described as follows: {description}

Write one complete, grammatical English sentence that contains words or phrases this feature would respond to.{previous}
Reply with the sentence only."""

NEUTRAL = """A feature of a language model is described as follows: {description}

Write one complete, grammatical English sentence about an unrelated topic, with no word or phrase connected to this feature.{previous}
Reply with the sentence only."""

PREVIOUS = "\nIt must differ from these sentences:\n{sentences}"

_RESULTS = re.compile(r"\bresults\b\s*\**\s*:\s*\**(.*)", re.IGNORECASE | re.DOTALL)
_CONNECTION = re.compile(r"^\s*[-*]?\s*connection\s*:\s*", re.IGNORECASE)


def input_lines(items: list[tuple[str, str, float]]) -> str:
    """One line per (token, context, activation)."""
    return "\n".join(
        f"- token {tok!r} | context: {ctx} | activation {v:.3g}" for tok, ctx, v in items
    )


def output_lines(items: list[tuple[str, float]]) -> str:
    """One line per (token, score)."""
    return "\n".join(f"- token {tok!r} | score {v:.3g}" for tok, v in items)


def results_section(answer: str) -> str | None:
    """The text after the first `Results:` (any case, markdown emphasis allowed), with a
    leading `- Connection:` removed and whitespace collapsed; None when there is none."""
    found = _RESULTS.search(answer or "")
    if not found:
        return None
    text = _CONNECTION.sub("", found.group(1).strip())
    text = " ".join(text.split())
    return text or None


def sentence_prompt(mode: str, description: str, previous: list[str]) -> str:
    """The prompt for one more sentence: `activating` or `neutral`."""
    template = {"activating": ACTIVATING, "neutral": NEUTRAL}[mode]
    listed = PREVIOUS.format(sentences="\n".join(previous)) if previous else ""
    return template.format(description=description, previous=listed)

"""Split a reasoning model's ``<think>...</think>`` from its answer, also across streamed pieces.

Follows vLLM's ``deepseek_r1`` reasoning parser: DeepSeek-R1 chat templates
open the ``<think>`` block in the prompt, so the output is reasoning from its
start (an optional leading ``<think>`` is dropped) up to the first
``</think>``, and answer after it. An output with no ``</think>`` is all
reasoning. Streaming holds back only the tail that could be the start of a
tag, so a tag split across pieces is still recognised and never leaks.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str = ""
    content: str = ""


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class ReasoningSplitter:
    """Feed text pieces in order; each call returns what can be released now."""

    def __init__(self) -> None:
        self._state = "opening"  # opening -> reasoning -> answer
        self._held = ""

    def feed(self, text: str) -> Split:
        if self._state == "answer":
            return Split(content=text)
        self._held += text
        if self._state == "opening":
            stripped = self._held.lstrip()
            if stripped.startswith(THINK_START):
                self._held = stripped[len(THINK_START):]
            elif THINK_START.startswith(stripped):
                return Split()  # could still become "<think>"
            self._state = "reasoning"
        if THINK_END in self._held:
            reasoning, _, content = self._held.partition(THINK_END)
            self._held = ""
            self._state = "answer"
            return Split(reasoning=reasoning, content=content)
        keep = _partial_tag_length(self._held, THINK_END)
        released, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
        return Split(reasoning=released)

    def finish(self) -> Split:
        """The end of the output: whatever was held back was reasoning after all."""
        held, self._held = self._held, ""
        if self._state == "answer":
            return Split(content=held)
        self._state = "answer"
        return Split(reasoning=held)


def split_reasoning(text: str) -> Split:
    """The whole output at once (non-streamed answers)."""
    splitter = ReasoningSplitter()
    first, last = splitter.feed(text), splitter.finish()
    return Split(reasoning=first.reasoning + last.reasoning, content=first.content + last.content)

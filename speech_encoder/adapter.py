"""From the streaming transcript into the frozen LLM while the user still speaks.

The chat template puts the user's words between a head and a tail:

    <|im_start|>system ... <|im_end|>  (history)  <|im_start|>user\\n | partial text | <|im_end|>\\n<|im_start|>assistant\\n
    '------------------------------- head ------------------------'                '-------------- tail -------------'

A ``TextAdapter`` keeps the session's ``PrefixCache`` holding head + the words
heard so far, chunk by chunk, through ``ChatLLM.extend`` (which keeps the longest
common prefix and computes only the rest):

- committed text only grows, so each update computes just the new words;
- the tentative tail is evaluated on top and is rolled back (and replaced) by the
  next update when it changed;
- a rollback of the committed text rolls the cache back to the divergence point
  the same way (extend's common prefix finds it);
- once the user has paused (``Hypothesis.silence_ms``), the tail is speculated
  too: if the turn really ends there, nothing at all is left to prefill.

At the end of the turn ``finalize(text)`` makes the cache hold exactly
``llm.prompt_ids(messages + [user: text])``, so the session's usual
``extend(cache, prompt_ids(...))`` that precedes generation computes 0 tokens.

``Adapter`` is the protocol the session talks to. A learned adapter (Whisper
encoder features projected into the LLM's embedding space, as in Freeze-Omni)
would implement the same three calls, taking its features from the hypothesis.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from agent.llm import ChatLLM, PrefixCache
from speech_encoder.streaming import Hypothesis

_SENTINEL = "\u2063USER\u2063"  # never in speech, and the template passes it through untouched


@dataclass(frozen=True)
class Prefill:
    """The LLM work one call did: tokens computed and wall time, ms."""

    tokens: int
    ms: float


class Adapter(Protocol):
    def begin(self, messages: list[dict]) -> Prefill:
        """A user turn starts; ``messages`` is the conversation before it (system
        prompt and history, the chat format of ChatLLM.prompt_ids)."""

    def update(self, hyp: Hypothesis) -> Prefill:
        """Bring the LLM's state up to this hypothesis of the turn in progress."""

    def finalize(self, text: str) -> Prefill:
        """The turn ended with ``text``: leave the cache ready to generate the reply."""


def split_template(llm: ChatLLM, messages: list[dict]) -> tuple[str, str]:
    """The rendered chat prompt before and after the text of a new user message."""
    rendered = llm.tokenizer.apply_chat_template(
        messages + [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True)
    head, sep, tail = rendered.partition(_SENTINEL)
    if not sep:
        raise ValueError("the chat template dropped the user's text")
    return head, tail


class TextAdapter:
    """Feeds the text of streaming hypotheses into ``cache`` (one per session).

    tentative: also prefill the tentative words (a few tokens per chunk, mostly
    kept). end_guess_ms: after this much trailing silence, also prefill the
    template's tail. All calls block: run them in the model worker thread.
    """

    def __init__(self, llm: ChatLLM, cache: PrefixCache, tentative: bool = True, end_guess_ms: int = 200):
        self.llm = llm
        self.cache = cache
        self.tentative = tentative
        self.end_guess_ms = end_guess_ms
        self._head = self._tail = ""

    def _ids(self, text: str) -> list[int]:
        # The whole string is tokenized every time (well under a millisecond), so the
        # ids of head + words are exactly those the template would give.
        return self.llm.tokenizer.encode(text, add_special_tokens=False)

    def _extend(self, prompt: str) -> Prefill:
        t0 = time.perf_counter()
        n = self.llm.extend(self.cache, self._ids(prompt))
        return Prefill(n, (time.perf_counter() - t0) * 1000)

    def begin(self, messages: list[dict]) -> Prefill:
        self._head, self._tail = split_template(self.llm, messages)
        return self._extend(self._head)

    def update(self, hyp: Hypothesis) -> Prefill:
        text = hyp.text if self.tentative else hyp.committed.strip()
        prompt = self._head + text
        if text and self.tentative and hyp.silence_ms >= self.end_guess_ms:
            prompt += self._tail
        return self._extend(prompt)

    def finalize(self, text: str) -> Prefill:
        return self._extend(self._head + text.strip() + self._tail)

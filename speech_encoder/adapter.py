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
_CLOSING = ".?!…。？！ "  # sentence-closing marks Whisper writes


@dataclass(frozen=True)
class Prefill:
    """The LLM work one call did: tokens computed and wall time, ms."""

    tokens: int
    ms: float


class Adapter(Protocol):
    hidden: object  # the LLM's state after the last word heard (what the state heads read), or None

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
    template's tail. int8: the words and the tail go through the LLM's int8
    decoding copies (``ChatLLM.extend(fast=True)``) on every prefill thread; the
    head (system prompt, history) is computed as the state heads were trained.
    All calls block: run them in the model worker thread.
    """

    def __init__(self, llm: ChatLLM, cache: PrefixCache, tentative: bool = True, end_guess_ms: int = 200,
                 int8: bool = False):
        self.llm = llm
        self.cache = cache
        self.tentative = tentative
        self.end_guess_ms = end_guess_ms
        self.int8 = int8
        self._head = self._tail = ""
        self._text, self._with_tail = None, False  # what the cache holds after head
        self.hidden = None  # the LLM's last-layer state at the last word heard (for the state heads)

    def _ids(self, text: str) -> list[int]:
        # The whole string is tokenized every time (well under a millisecond), so the
        # ids of head + words are exactly those the template would give.
        return self.llm.tokenizer.encode(text, add_special_tokens=False)

    def _extend(self, ids: list[int], hidden_at: int | None = None, words: bool = True) -> Prefill:
        t0 = time.perf_counter()
        n = self.llm.extend(self.cache, ids, hidden_at=hidden_at, fast=self.int8 and words,
                            threads=self.llm.prefill_threads)
        return Prefill(n, (time.perf_counter() - t0) * 1000)

    def begin(self, messages: list[dict]) -> Prefill:
        self._head, self._tail = split_template(self.llm, messages)
        self._text, self._with_tail, self.hidden = None, False, None
        return self._extend(self._ids(self._head), words=False)

    def update(self, hyp: Hypothesis) -> Prefill:
        """Also leaves ``hidden`` at the LLM's state after the last word (before
        any closing mark and any speculated tail), which is what the state heads
        read: one forward pass computes both."""
        text = hyp.text if self.tentative else hyp.committed.strip()
        guess_end = bool(text) and self.tentative and hyp.silence_ms >= self.end_guess_ms
        if text == self._text and (self._with_tail or not guess_end):
            return Prefill(0, 0.0)  # nothing new heard: no rollback of a speculated tail either
        words = self._ids(self._head + text)
        ids = self._ids(self._head + text + self._tail) if guess_end else words
        prefill = self._extend(ids, hidden_at=self._last_word(words, text))
        self.hidden = self.cache.hidden
        self._text, self._with_tail = text, guess_end
        return prefill

    def _last_word(self, words: list[int], text: str) -> int:
        """Position of the last word's last token. Whisper closes a window that ends
        mid-sentence with "." or "?" as readily as a finished one ("... the name
        of?"): that mark is a guess about words not yet heard, so the heads read
        the state before it (the LLM is causal: the same as if it were absent)."""
        bare = self._ids(self._head + text.rstrip(_CLOSING))
        if len(bare) < len(words) and words[:len(bare)] == bare and len(bare) > len(self._ids(self._head)):
            return len(bare) - 1
        return len(words) - 1

    def finalize(self, text: str) -> Prefill:
        self._text, self._with_tail = text.strip(), True
        return self._extend(self._ids(self._head + text.strip() + self._tail))

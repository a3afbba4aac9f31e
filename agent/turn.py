"""One user turn, heard while the agent is silent: the words stream into the LLM.

Per chunk (``listen``, in the model thread):

    audio -> StreamingTranscriber.push -> Hypothesis (committed + tentative words)
          -> TextAdapter.update: the session's KV cache grows with the words
                                 (and the LLM's state after the last word is kept)

on the event loop, on every chunk and whenever new words come back (``decide``,
a small MLP, well under a millisecond):

    StateHead(that state, the timing now) -> continue | interrupt | reject

and once the session ends the turn (``final``): the transcriber's last step,
then ``TextAdapter.finalize``, which leaves the cache holding exactly the
reply's prompt, so generation starts with (almost) nothing left to prefill.

The session (agent/session.py) owns the turn on the event loop: it collects the
frames, hands each chunk's new ones to ``listen`` and acts on the verdicts. A
turn is used for one utterance only; a new turn makes a new transcriber (the
Whisper model itself is shared).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from agent.heads import Timing
from speech_encoder.adapter import Prefill, TextAdapter
from speech_encoder.streaming import Hypothesis, StreamingOptions, StreamingTranscriber


@dataclass(frozen=True)
class Heard:
    """What one chunk of listening found."""

    hypothesis: Hypothesis
    hidden: torch.Tensor | None  # the LLM's state after the last word (None before any words)
    prefill: Prefill  # LLM work this chunk
    seen_end: bool  # the hypothesis was taken after the speech stopped (its last words are in)


@dataclass(frozen=True)
class Final:
    """The end of a turn: its transcript and what was left to do at that moment."""

    text: str  # "" when the turn held no words (noise, a hallucination withdrawn)
    no_speech_prob: float
    compute_ms: float  # the transcriber's last step and the last prefill
    prefill: Prefill  # the prefill left at the end (0 tokens when the words were all in)


@dataclass
class UserTurn:
    """Loop side: ``frames`` heard so far and how many went to the model thread."""

    id: int
    messages: list[dict]  # system prompt and history when the turn opened: the prompt's head
    frames: list[np.ndarray] = field(default_factory=list)
    sent: int = 0
    speech_ms: int = 0  # voiced audio in the turn
    voiced_mark: int = 0  # the endpointer's voiced-ms count when last looked at
    text: str = ""  # the latest hypothesis, as far as the loop has heard
    hidden: torch.Tensor | None = None  # ... and the LLM's state after its last word
    in_flight: int = 0  # chunks handed to ``listen`` and not yet back
    seen_end: bool = False  # the latest hypothesis was taken after the speech stopped
    opened_at: float = 0.0  # media time
    # Model-thread side, made by the first ``listen``:
    transcriber: StreamingTranscriber | None = None
    adapter: TextAdapter | None = None

    def take_new(self) -> np.ndarray:
        """The frames not yet handed to ``listen``, as one array."""
        new, self.sent = self.frames[self.sent:], len(self.frames)
        return np.concatenate(new) if new else np.zeros(0, np.float32)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.frames) if self.frames else np.zeros(0, np.float32)

    # -- model thread --------------------------------------------------------------------------

    def _start(self, engine, cache) -> None:
        cfg = engine.config
        self.transcriber = StreamingTranscriber.from_asr(engine.asr, StreamingOptions(threads=cfg.torch_threads),
                                                         model_name=cfg.asr_model)
        # The prompt's end is computed with the words the transcriber takes once the
        # speech stops: if the turn ends there, nothing is left to prefill.
        self.adapter = TextAdapter(engine.llm, cache, tentative=True,
                                   end_guess_ms=self.transcriber.options.end_step_ms, int8=cfg.listen_int8)
        self.adapter.begin(self.messages)

    def listen(self, engine, cache, audio: np.ndarray, ahead: bool = False) -> Heard:
        """Model thread: push ``audio`` and feed the words to the LLM. ``ahead``:
        the speech has been silent for a frame less than the transcriber's end
        step; that step is taken now, for the next frame's push to adopt."""
        if self.transcriber is None:
            self._start(engine, cache)
        hyp = self.transcriber.push(audio)
        prefill = self.adapter.update(hyp)
        seen_end = hyp.silence_ms >= self.transcriber.options.end_step_ms
        if ahead:
            self.transcriber.step_ahead()
        return Heard(hyp, self.adapter.hidden if hyp.text else None, prefill, seen_end)

    def decide(self, head, timing: Timing) -> tuple[str, dict] | None:
        """The state head's verdict on the words heard so far, with ``timing`` as
        it is now (cheap: a small MLP, so the loop can ask on every frame). None
        without a head or before any words."""
        if head is None or self.hidden is None:
            return None
        verdict = head.decide(self.hidden, timing)
        return verdict.label, verdict.by_label()

    def final(self, engine, cache, audio: np.ndarray) -> Final:
        """Model thread: the rest of the audio, the last step, the reply's prompt in the cache."""
        t0 = time.perf_counter()
        if self.transcriber is None:
            self._start(engine, cache)
        if len(audio):
            self.transcriber.push(audio)
        hyp = self.transcriber.finish()
        text = hyp.committed.strip()
        prefill = self.adapter.finalize(text) if text else Prefill(0, 0.0)
        return Final(text, hyp.no_speech_prob, (time.perf_counter() - t0) * 1000, prefill)

"""Reply text as it is generated -> speech at the engine's rate, cancellable.

The LLM worker calls ``feed`` with each new piece of text; complete clause
groups are normalised and queued for the TTS worker, which synthesizes them in
order while the LLM goes on. Audio comes back to the event loop through
``on_audio(samples, text)``: ``text`` is non-empty on the call that completes a
group, so the session knows which words have been played. ``cancel`` stops both
the grouping and the synthesis within one piece of work; nothing reaches back up.

``ahead`` (optional) says how many seconds of audio wait to be played; with the
text already queued for the voice it tells when the speech is about to run dry,
and then groups are cut short (``ClauseGrouper.push(urgent=True)``).

``say_again`` (optional) is said instead of a reply that holds no words: nothing
speakable, or only numbers and punctuation ("1. 1. 1. 1.", a small model's loop
on a misheard turn). Text with no letter is held until a word comes; a lone
number ("8.") is an answer and is voiced at the end; a second number before any
word decides it at once. A user who is met with silence, or with a count, does
not know they were misheard; asked to say it again, they do.
"""
from __future__ import annotations

import asyncio
import queue
import re
import threading
from concurrent.futures import Executor
from typing import Callable, Iterator

import numpy as np

from agent.config import SAMPLE_RATE
from speech_decoder.normalize import CodeFenceFilter, normalize
from speech_decoder.pacing import ClauseGrouper, Pacing
from speech_encoder.audio import resample
from tts.base import TTSBackend

_END = object()
_LETTER = re.compile(r"[^\W\d_]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")  # "3.14" and "1,000" are one number
CHARS_PER_S = 15.0  # speaking rate of the voices, near enough (Piper joe: 14-16)
URGENT_S = 1.5  # less speech than this ahead (played or queued as text): cut groups short


class SpeechDecoder:
    def __init__(self, tts: TTSBackend, executor: Executor, loop: asyncio.AbstractEventLoop,
                 on_audio: Callable[[np.ndarray, str], None], on_group: Callable[[str], None] | None = None,
                 pacing: Pacing = Pacing(), ahead: Callable[[], float] | None = None, say_again: str = ""):
        self._tts = tts
        self._loop = loop
        self._on_audio = on_audio
        self._on_group = on_group
        self._fences = CodeFenceFilter()
        self._grouper = ClauseGrouper(pacing)
        self._groups: queue.Queue = queue.Queue()
        self._ahead = ahead
        self._lock = threading.Lock()
        self._queued_chars = 0  # text sent to the voice whose audio has not come back
        self._say_again = say_again
        self._held: list[str] = []  # groups with no letter yet, before the reply's first word
        self._worded = not say_again  # a word has been voiced (or no check asked for)
        self.said_instead = ""  # say_again, once said in place of a wordless reply: no text is taken after it
        self.cancelled = threading.Event()
        self.first_done = threading.Event()  # the first group is synthesized (or never will be)
        self.spoken_text: list[str] = []  # normalised groups sent to the voice, in order
        self.done: asyncio.Future = loop.create_future()
        self._job = loop.run_in_executor(executor, self._synthesize)
        self._job.add_done_callback(self._finish)

    # -- called from the LLM worker thread --
    def feed(self, text: str) -> None:
        if not self.cancelled.is_set() and not self.said_instead:
            self._queue_groups(self._grouper.push(self._fences.push(text), self._running_dry()))

    def _running_dry(self) -> bool:
        if self._ahead is None or not self.spoken_text:
            return False  # the first group has its own rule
        with self._lock:
            queued = self._queued_chars
        return self._ahead() + max(0, queued) / CHARS_PER_S < URGENT_S

    def end(self) -> None:
        """No more text: flush what is held and let synthesis finish."""
        if not self.cancelled.is_set() and not self.said_instead:
            self._queue_groups(self._grouper.push(self._fences.flush()) + self._grouper.flush())
            if not self._worded and not self.said_instead:
                held = " ".join(self._held)
                self._voice(held if len(_NUMBER.findall(held)) == 1 else self._instead())
        self._groups.put(_END)

    def _instead(self) -> str:
        self.said_instead = self._say_again
        return self._say_again

    def _queue_groups(self, groups: list[str]) -> None:
        for g in groups:
            spoken = normalize(g)
            if not spoken or self.said_instead:
                continue
            if not self._worded:
                if not _LETTER.search(spoken):
                    self._held.append(spoken)
                    if len(_NUMBER.findall(" ".join(self._held))) > 1:
                        self._voice(self._instead())
                    continue
                self._worded = True
                spoken = " ".join(self._held + [spoken])
            self._voice(spoken)

    def _voice(self, spoken: str) -> None:
        self.spoken_text.append(spoken)
        with self._lock:
            self._queued_chars += len(spoken)
        if self._on_group:
            self._loop.call_soon_threadsafe(self._on_group, spoken)
        self._groups.put(spoken)

    # -- any thread --
    def cancel(self) -> None:
        self.cancelled.set()
        self.first_done.set()
        self._groups.put(_END)  # wake the TTS worker if it waits for text

    # -- the TTS worker thread --
    def _texts(self) -> Iterator[str]:
        while (g := self._groups.get()) is not _END:
            if self.cancelled.is_set():
                return
            yield g

    def _synthesize(self) -> None:
        try:
            for piece in self._tts.stream(self._texts(), self.cancelled):
                if self.cancelled.is_set():
                    return
                audio = resample(piece.audio, self._tts.sample_rate, SAMPLE_RATE)
                self._loop.call_soon_threadsafe(self._deliver, audio, piece.text)
                if piece.text:
                    self.first_done.set()
        finally:
            self.first_done.set()

    def _deliver(self, audio: np.ndarray, text: str) -> None:
        if text:
            with self._lock:
                self._queued_chars -= len(text)
        if not self.cancelled.is_set():
            self._on_audio(audio, text)

    def _finish(self, job: asyncio.Future) -> None:
        # call_soon keeps ordering: audio delivered before the job ended lands first.
        def settle():
            if not self.done.done():
                if job.exception():
                    self.done.set_exception(job.exception())
                else:
                    self.done.set_result(None)
        self._loop.call_soon(settle)

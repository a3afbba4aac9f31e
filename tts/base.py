"""The streaming TTS protocol every backend speaks.

Text goes in as it is generated and audio comes out as it is made: a backend's
``stream`` consumes an iterable of text pieces (which may block while the LLM is
still writing) and yields ``SpeechPiece`` objects as soon as each is synthesized.
It runs in a worker thread, never on the event loop, and it checks ``cancel``
between pieces (and inside long syntheses) so that a barge-in stops it within one
piece of work.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


@dataclass(frozen=True)
class SpeechPiece:
    """One piece of synthesized audio and the text it speaks.

    audio: float32 mono samples in [-1, 1] at the backend's ``sample_rate``.
    text: the input text this audio voices ("" when a backend cannot tell), so the
    decoder can know which words were actually played when speech is cut off.
    """

    audio: np.ndarray
    text: str


class TTSBackend(abc.ABC):
    """A loaded TTS model, shared by sessions; ``stream`` is safe to call from one
    worker thread per session."""

    name: str = "tts"
    sample_rate: int = 16000

    @abc.abstractmethod
    def stream(self, text: Iterable[str], cancel: threading.Event) -> Iterator[SpeechPiece]:
        """Synthesize ``text`` pieces as they arrive; stop early once ``cancel`` is set."""

    def synthesize(self, text: str) -> np.ndarray:
        """Whole-text convenience: all pieces of one text, concatenated."""
        pieces = [p.audio for p in self.stream([text], threading.Event())]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

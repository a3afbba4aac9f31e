"""Voice activity and endpointing on the user's audio.

webrtcvad says per 20 ms frame whether it holds speech; ``Endpointer`` turns
that into turn boundaries with hysteresis: a turn opens after ``start_ms`` of
voiced frames within a short window, and closes after ``end_ms`` of silence. The
boundaries it reports are where speech really started and stopped (the first
and last voiced frame), not where the decision was taken, so latencies measured
from them are honest.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

from agent.config import SAMPLE_RATE, VAD_FRAME_MS
from speech_encoder.audio import to_pcm16

FRAME_SAMPLES = SAMPLE_RATE * VAD_FRAME_MS // 1000
# webrtcvad judges spectral shape, not loudness: it calls faint hiss speech. Frames
# quieter than this (about the noise floor of a quiet room through a laptop mic)
# are silence whatever it says.
ENERGY_FLOOR_DBFS = -55.0
_FLOOR_RMS = 10 ** (ENERGY_FLOOR_DBFS / 20)


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" | "end"
    t: float  # media time of the first voiced sample (start) or just after the last one (end), s
    decided_at: float  # media time at which the endpointer knew, s


class Endpointer:
    """Streaming endpointing over 20 ms frames of 16 kHz float audio."""

    def __init__(self, aggressiveness: int = 2, start_ms: int = 100, end_ms: int = 400):
        self._vad = webrtcvad.Vad(aggressiveness)
        self._start_frames = max(1, start_ms // VAD_FRAME_MS)
        self._end_frames = max(1, end_ms // VAD_FRAME_MS)
        # A turn opens when start_frames of the last (2 * start_frames) frames are voiced,
        # so one clicked frame does not open it and one unvoiced frame does not reset it.
        self._window: deque[tuple[float, bool]] = deque(maxlen=2 * self._start_frames)
        self.in_speech = False
        self._last_voiced_end = 0.0
        self._silent_frames = 0
        self.voiced_ms_in_turn = 0

    def is_speech(self, frame: np.ndarray) -> bool:
        if float(np.sqrt(np.mean(np.square(frame)))) < _FLOOR_RMS:
            return False
        return self._vad.is_speech(to_pcm16(frame).tobytes(), SAMPLE_RATE)

    def process(self, frame: np.ndarray, t: float) -> list[VadEvent]:
        """Feed one 20 ms frame starting at media time ``t``; returns 0 or 1 events."""
        voiced = self.is_speech(frame)
        end_of_frame = t + VAD_FRAME_MS / 1000
        if not self.in_speech:
            self._window.append((t, voiced))
            if sum(v for _, v in self._window) >= self._start_frames:
                start = next(ts for ts, v in self._window if v)
                self.in_speech, self._silent_frames = True, 0
                self._last_voiced_end = end_of_frame
                self.voiced_ms_in_turn = self._start_frames * VAD_FRAME_MS
                self._window.clear()
                return [VadEvent("start", start, end_of_frame)]
            return []
        if voiced:
            self._silent_frames = 0
            self._last_voiced_end = end_of_frame
            self.voiced_ms_in_turn += VAD_FRAME_MS
            return []
        self._silent_frames += 1
        if self._silent_frames >= self._end_frames:
            self.in_speech = False
            return [VadEvent("end", self._last_voiced_end, end_of_frame)]
        return []

    @property
    def onset_frames(self) -> int:
        """Out of speech: voiced frames in the window that opens a turn (it opens at start_frames)."""
        return 0 if self.in_speech else sum(v for _, v in self._window)

    @property
    def last_voiced_end(self) -> float:
        """Media time just after the last voiced frame of the current turn, s."""
        return self._last_voiced_end

    @property
    def silence_ms(self) -> int:
        """Silence since the last voiced frame of the current turn."""
        return self._silent_frames * VAD_FRAME_MS if self.in_speech else 0

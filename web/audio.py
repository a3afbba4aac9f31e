"""Audio between WebRTC (Opus, 48 kHz) and the engine (float32 mono, 16 kHz).

The two rates differ by exactly three, so the conversion is a stateful FIR
filter plus decimation or zero-stuffing: streaming it frame by frame gives the
same samples as converting the whole signal at once (no seams at frame edges),
and 16 kHz chunks of n samples become exactly 3n samples at 48 kHz, so the
outgoing frames stay on the session's chunk clock. (``agent.clock.InputBuffer``
then places the user's audio on the session's timeline by its timestamp.)
"""
from __future__ import annotations

import numpy as np
from av import AudioFrame
from scipy.signal import firwin, lfilter

from agent.config import SAMPLE_RATE

RTC_RATE = 48000  # Opus in WebRTC always runs at 48 kHz
RATIO = RTC_RATE // SAMPLE_RATE
assert RATIO * SAMPLE_RATE == RTC_RATE, "the engine rate must divide 48 kHz"
FRAME_MS = 20  # one outgoing WebRTC audio frame
FRAME_SAMPLES_48K = RTC_RATE * FRAME_MS // 1000
_TAPS = firwin(97, 0.9 * SAMPLE_RATE / 2, fs=RTC_RATE)  # low-pass just under 8 kHz; 1 ms group delay


class Decimator:
    """48 kHz -> 16 kHz, stateful: feed consecutive blocks of any length."""

    def __init__(self) -> None:
        self._zi = np.zeros(len(_TAPS) - 1)
        self._pos = 0  # input samples consumed so far

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros(0, np.float32)
        y, self._zi = lfilter(_TAPS, 1.0, x, zi=self._zi)
        first = (-self._pos) % RATIO  # keep the samples whose global index divides by 3
        self._pos += len(x)
        return y[first::RATIO].astype(np.float32)


class Interpolator:
    """16 kHz -> 48 kHz, stateful: n samples in, exactly 3n out."""

    def __init__(self) -> None:
        self._zi = np.zeros(len(_TAPS) - 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros(0, np.float32)
        up = np.zeros(len(x) * RATIO)
        up[::RATIO] = x
        y, self._zi = lfilter(_TAPS * RATIO, 1.0, up, zi=self._zi)
        return y.astype(np.float32)


def frame_to_mono(frame: AudioFrame) -> np.ndarray:
    """A decoded frame (any sample format and layout) -> float32 mono in [-1, 1]."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        data = data.reshape(channels, -1).T
    else:
        data = data.reshape(-1, channels)
    mono = data.mean(axis=1)
    if np.issubdtype(data.dtype, np.integer):
        mono = mono / float(np.iinfo(data.dtype).max + 1)
    return mono.astype(np.float32)


def mono_to_frames(x48: np.ndarray, first_pts: int) -> list[AudioFrame]:
    """float32 mono 48 kHz (a whole number of 20 ms frames) -> s16 mono frames with pts."""
    pcm = (np.clip(x48, -1.0, 1.0) * 32767).astype(np.int16)
    frames = []
    for i in range(0, len(pcm), FRAME_SAMPLES_48K):
        frame = AudioFrame.from_ndarray(pcm[None, i:i + FRAME_SAMPLES_48K], format="s16", layout="mono")
        frame.sample_rate = RTC_RATE
        frame.pts = first_pts + i
        frames.append(frame)
    return frames


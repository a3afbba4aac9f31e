"""Acoustic echo cancellation: the WebRTC audio processing module (AEC3).

On open speakers the microphone hears the agent. The canceller is given the
exact signal the speaker played (the *reference*, or far end) and removes its
echo from the microphone (the near end), so that the endpointer hears the user
and not the agent's own voice.

The engine is WebRTC's AudioProcessingModule as built into the ``livekit``
wheel (``livekit.rtc.AudioProcessingModule``): a maintained binding with a
prebuilt library, nothing to compile. It takes 10 ms frames of 16-bit PCM;
``EchoCanceller`` takes float32 16 kHz audio of any length and keeps the
remainder between calls.

Echo that survives the canceller (residual echo, double talk) is left to the
session: see ``agent.transports.local.CaptureChunk`` for the hook the state
heads read.
"""
from __future__ import annotations

import threading

import numpy as np

from agent.config import SAMPLE_RATE

FRAME_SAMPLES = SAMPLE_RATE // 100  # the module's unit: 10 ms
_PCM_SCALE = 32767.0


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * _PCM_SCALE).round().astype(np.int16)


class EchoCanceller:
    """Near end minus the echo of the far end, both float32 mono 16 kHz.

    ``render(played)`` is called with the far end as it goes to the speaker (in
    order, before its echo can reach the microphone); ``capture(mic)`` returns
    the microphone with the echo removed, same length, delayed by nothing.
    Both may be called with any length: audio is processed in 10 ms frames and
    a partial frame waits for the next call (so ``capture`` returns as many
    samples as complete frames allow, the rest on a later call).

    One owner thread calls both; ``stats`` may be read from any thread.
    """

    def __init__(self, delay_hint_ms: int = 0, noise_suppression: bool = False):
        from livekit import rtc  # loads the native library: only when a canceller is made

        self._rtc = rtc
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=noise_suppression,
                                              high_pass_filter=True, auto_gain_control=False)
        self._render_rest = np.zeros(0, np.float32)
        self._capture_rest = np.zeros(0, np.float32)
        self._lock = threading.Lock()
        self._energy_in = 0.0  # microphone energy while the far end was active
        self._energy_out = 0.0  # what the canceller left of it
        self._far_active = 0  # 10 ms frames of far-end audio not yet matched by a capture frame
        self.set_delay_hint(delay_hint_ms)

    def set_delay_hint(self, ms: int) -> None:
        """Estimated delay from ``render`` to the echo in ``capture`` (the module also tracks it)."""
        self._apm.set_stream_delay_ms(max(0, int(ms)))

    def _frame(self, x: np.ndarray):
        return self._rtc.AudioFrame(_to_pcm16(x).tobytes(), SAMPLE_RATE, 1, FRAME_SAMPLES)

    def render(self, played: np.ndarray) -> None:
        x = np.concatenate([self._render_rest, played.astype(np.float32)])
        whole = len(x) - len(x) % FRAME_SAMPLES
        for i in range(0, whole, FRAME_SAMPLES):
            frame = x[i:i + FRAME_SAMPLES]
            self._apm.process_reverse_stream(self._frame(frame))
            if np.max(np.abs(frame)) > 1e-3:
                self._far_active = 30  # the echo tail lasts a while after the far end stops: 300 ms
        self._render_rest = x[whole:]

    def capture(self, mic: np.ndarray) -> np.ndarray:
        x = np.concatenate([self._capture_rest, mic.astype(np.float32)])
        whole = len(x) - len(x) % FRAME_SAMPLES
        out = np.empty(whole, np.float32)
        for i in range(0, whole, FRAME_SAMPLES):
            frame = self._frame(x[i:i + FRAME_SAMPLES])
            self._apm.process_stream(frame)
            clean = np.frombuffer(frame.data, np.int16).astype(np.float32) / _PCM_SCALE
            out[i:i + FRAME_SAMPLES] = clean
            if self._far_active:
                self._far_active -= 1
                with self._lock:
                    self._energy_in += float(np.sum(np.square(x[i:i + FRAME_SAMPLES])))
                    self._energy_out += float(np.sum(np.square(clean)))
        self._capture_rest = x[whole:]
        return out

    @property
    def stats(self) -> dict:
        """Echo return loss enhancement over the frames where the far end played.

        It counts every such frame, double talk included, so it understates the
        canceller when the user talks over the agent; a test with a known echo
        path measures it exactly (tests/agent/test_local_audio.py).
        """
        with self._lock:
            e_in, e_out = self._energy_in, self._energy_out
        erle = 10 * np.log10((e_in + 1e-9) / (e_out + 1e-9)) if e_in > 1e-6 else None
        return {"erle_db": None if erle is None else round(float(erle), 1)}

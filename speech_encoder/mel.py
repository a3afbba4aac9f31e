"""Whisper's log-mel spectrogram, computed incrementally over fixed chunks.

openai-whisper computes, for a whole utterance x of L samples:

    stft  = STFT(x, n_fft=400, hop=160, periodic Hann, center=True, reflect padding)
    power = |stft|^2 without the last frame        -> L // 160 frames
    raw   = log10(max(mel_filters @ power, 1e-10))
    out   = (max(raw, raw.max() - 8) + 4) / 4

How the streaming version gives the same numbers:

- Frame i is centred on sample 160 i and reads the padded signal over
  [160 i - 200, 160 i + 200). Frames whose window lies inside the audio received
  so far never change again: they are computed once, when their last sample
  arrives, and kept as *raw* log-mel (before the clamp).
- The first two frames reach before sample 0: the reflect padding there is
  x[200:0:-1], known as soon as 201 samples have arrived.
- The last frame or two reach past the end received so far. They are
  *provisional*: computed with the reflect padding of the current end (exactly
  what the whole-utterance spectrogram of the audio so far holds) and recomputed
  on every call until enough audio arrives to make them final.
- The clamp depends on the maximum over the whole spectrogram, so it is never
  stored: ``window()`` applies it over the frames it returns. Over the whole
  utterance that is Whisper's global clamp; over a trimmed window it is the clamp
  Whisper would apply to that window's audio on its own.

Memory is bounded by ``drop_before``: frames (and the samples behind them) older
than the window are forgotten; frame indices stay absolute.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

N_FFT = 400
HOP = 160  # samples per mel frame: 10 ms at 16 kHz
PAD = N_FFT // 2  # centre padding on each side, samples


@lru_cache(maxsize=None)
def _filters(n_mels: int) -> torch.Tensor:
    from whisper.audio import mel_filters

    return mel_filters("cpu", n_mels)


@lru_cache(maxsize=None)
def _hann() -> torch.Tensor:
    return torch.hann_window(N_FFT)


def raw_log_mel(padded: np.ndarray, n_frames: int, n_mels: int = 80) -> torch.Tensor:
    """Unclamped log10 mel of ``n_frames`` frames read from an already padded signal.

    padded: float32 [>= (n_frames - 1) * HOP + N_FFT] samples; frame j reads
    padded[j * HOP : j * HOP + N_FFT]. Returns float32 [n_mels, n_frames].
    """
    if n_frames <= 0:
        return torch.zeros(n_mels, 0)
    x = torch.from_numpy(np.ascontiguousarray(padded[:(n_frames - 1) * HOP + N_FFT], dtype=np.float32))
    spec = torch.stft(x, N_FFT, HOP, window=_hann(), center=False, return_complex=True)
    return torch.clamp(_filters(n_mels) @ spec.abs() ** 2, min=1e-10).log10()


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """Whisper's clamp and scaling of raw log-mel [n_mels, n] over the frames given."""
    if raw.shape[-1] == 0:
        return raw
    return (torch.maximum(raw, raw.max() - 8.0) + 4.0) / 4.0


class StreamingMel:
    """Incremental log-mel of one utterance (16 kHz float32 in, 10 ms frames out)."""

    def __init__(self, n_mels: int = 80):
        self.n_mels = n_mels
        self._tail = np.zeros(0, np.float32)  # samples from absolute index _tail_start on
        self._tail_start = 0
        self.n_samples = 0  # samples pushed in all
        self.first_frame = 0  # absolute index of the oldest frame kept
        self._final = torch.zeros(n_mels, 0)  # raw frames first_frame .. first_frame + n_final
        self._head: np.ndarray | None = None  # the first PAD + 1 samples, for the left reflection

    @property
    def n_frames(self) -> int:
        """Frames of the whole-utterance spectrogram of the audio so far (final and provisional)."""
        return self.n_samples // HOP

    @property
    def n_final(self) -> int:
        """Absolute index one past the last frame that no future audio can change."""
        return self.first_frame + self._final.shape[1]

    def push(self, samples: np.ndarray) -> None:
        """Append samples (float32 [n], 16 kHz) and compute the frames they complete."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._tail = np.concatenate([self._tail, samples])
        self.n_samples += len(samples)
        if self._head is None and self.n_samples > PAD:
            self._head = self._tail[:PAD + 1].copy()  # nothing is trimmed before a frame is final
        if self._head is None:
            return
        # Frame i is final once its window's last sample, 160 i + 199, has arrived.
        last = min((self.n_samples - PAD) // HOP + 1, self.n_frames)
        new = last - self.n_final
        if new > 0:
            _, padded = self._padded_from(self.n_final)
            frames = raw_log_mel(padded, new, self.n_mels)
            self._final = torch.cat([self._final, frames], dim=1)
            self._trim_samples()

    def _padded_from(self, frame: int) -> tuple[int, np.ndarray]:
        """The centre-padded signal from frame ``frame``'s first sample on, with the
        left reflection when it reaches before sample 0 (and nothing on the right)."""
        start = frame * HOP - PAD  # absolute sample index; negative inside the left pad
        if start >= 0:
            return start, self._tail[start - self._tail_start:]
        left = self._head[1:PAD + 1][::-1][PAD + start:]  # x[-start], ..., x[1]
        return start, np.concatenate([left, self._tail])

    def _trim_samples(self) -> None:
        # Keep only the samples a frame not yet final can read.
        keep_from = max(0, self.n_final * HOP - PAD)
        cut = keep_from - self._tail_start
        if cut > 0:
            self._tail = self._tail[cut:]
            self._tail_start = keep_from

    def _provisional(self) -> torch.Tensor:
        """Frames n_final .. n_frames, padded on the right by reflecting the current end."""
        n = self.n_frames - self.n_final
        if n <= 0:
            return torch.zeros(self.n_mels, 0)
        if self._head is None:  # at most PAD samples (torch's reflect padding would refuse them)
            return raw_log_mel(np.pad(self._tail, PAD, mode="reflect"), n, self.n_mels)
        _, padded = self._padded_from(self.n_final)
        right = padded[-PAD - 1:-1][::-1]  # x[L-2], ..., x[L-PAD-1]
        return raw_log_mel(np.concatenate([padded, right]), n, self.n_mels)

    def raw(self, start: int | None = None) -> torch.Tensor:
        """Raw (unclamped) log-mel of absolute frames [start, n_frames): final and provisional."""
        start = self.first_frame if start is None else max(start, self.first_frame)
        kept = self._final[:, start - self.first_frame:]
        return torch.cat([kept, self._provisional()], dim=1)

    def window(self, start: int | None = None) -> torch.Tensor:
        """Whisper's log-mel [n_mels, n] of frames [start, n_frames), clamped over those frames."""
        return normalize(self.raw(start))

    def drop_before(self, frame: int) -> None:
        """Forget final frames older than absolute index ``frame``."""
        k = min(max(0, frame - self.first_frame), self._final.shape[1])
        if k:
            self._final = self._final[:, k:].clone()
            self.first_frame += k

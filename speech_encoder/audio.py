"""Audio in and out of files, and resampling. There is no ffmpeg: WAV only.

All audio inside duplex is float32 mono in [-1, 1]; PCM16 appears only at the
edges (files, the network).
"""
from __future__ import annotations

import struct
import wave
from math import gcd
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


class AudioFormatError(ValueError):
    """A file that is not audio we can read; the message says why."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a RIFF/WAVE file: PCM 8/16/24/32-bit or IEEE float 32/64, any channels.

    Returns (samples, rate) with samples float32 shaped [n, channels].
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AudioFormatError(f"cannot read {path}: {e.strerror}") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFormatError(f"{path} is not a WAV file (no RIFF/WAVE header)")
    fmt, payload, pos = None, None, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioFormatError(f"{path}: truncated fmt chunk")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == _EXTENSIBLE and len(body) >= 26:
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            payload = body  # a truncated final chunk keeps the whole samples it has
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None:
        raise AudioFormatError(f"{path}: missing {'fmt' if fmt is None else 'data'} chunk")
    tag, channels, rate, _, _, bits = fmt
    if channels < 1 or rate < 1000:
        raise AudioFormatError(f"{path}: implausible format ({channels} channels at {rate} Hz)")
    width = bits // 8
    usable = len(payload) - len(payload) % (width * channels)
    raw = payload[:usable]
    if tag == _FLOAT and bits in (32, 64):
        x = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif tag == _PCM and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif tag == _PCM and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    elif tag == _PCM and bits == 32:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    else:
        raise AudioFormatError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits)")
    return np.nan_to_num(x).clip(-1.0, 1.0).reshape(-1, channels), rate


def to_mono(samples: np.ndarray) -> np.ndarray:
    return samples.mean(axis=1).astype(np.float32) if samples.ndim == 2 else samples.astype(np.float32)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Polyphase resampling along the first axis (exact rational ratio)."""
    if src_rate == dst_rate or len(x) == 0:
        return x.astype(np.float32)
    g = gcd(src_rate, dst_rate)
    return resample_poly(x, dst_rate // g, src_rate // g, axis=0).astype(np.float32)


def load_audio(path: str | Path, rate: int) -> np.ndarray:
    """A WAV file as float32 mono at ``rate``."""
    samples, src = read_wav(path)
    return resample(to_mono(samples), src, rate)


def to_pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """PCM16 WAV; ``samples`` is [n] (mono) or [n, channels] float in [-1, 1]."""
    x = samples if samples.ndim == 2 else samples[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(to_pcm16(x).tobytes())

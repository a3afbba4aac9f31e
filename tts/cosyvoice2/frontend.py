"""Audio front end for speaker registration: features and the directory's ONNX models.

- ``kaldi_fbank``: Kaldi-style log mel filterbank (25 ms / 10 ms, povey window, pre-emphasis
  0.97, DC removal, 512-point power spectrum, 80 Kaldi mel bins from 20 Hz), the input of
  ``campplus.onnx`` after per-utterance mean removal -> 192-dim x-vector.
- ``whisper_log_mel``: Whisper's 128-bin log mel (n_fft 400, hop 160, clamp to max - 8,
  (x + 4) / 4), the input of ``speech_tokenizer_v2.onnx`` -> 25 Hz speech tokens.
- ``prompt_mel``: the flow's 80-bin log mel at 24 kHz (n_fft = win = 1920, hop 480, Slaney
  mel 0-8 kHz, reflect padding, no centring, log(max(x, 1e-5))): prompt_feat, 50 Hz.
All take mono float waveforms in [-1, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.signal import resample_poly

from .speakers import Speaker

CAMPPLUS = "campplus.onnx"
SPEECH_TOKENIZER = "speech_tokenizer_v2.onnx"


def resample(wav: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wav.astype(np.float32)
    g = np.gcd(sr, target)
    return resample_poly(wav, target // g, sr // g).astype(np.float32)


# ------------------------------------------------------------------- mel scales
def _kaldi_mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + f / 700.0)


def kaldi_mel_banks(n_bins: int, n_fft: int, sr: float, low: float = 20.0, high: float = 0.0) -> np.ndarray:
    """Triangular Kaldi mel filters [n_bins, n_fft // 2] (no Nyquist bin, as Kaldi)."""
    nyq = sr / 2
    high = high if high > 0 else nyq + high
    fft_freqs = np.arange(n_fft // 2) * sr / n_fft
    m = _kaldi_mel(fft_freqs)
    lo, hi = _kaldi_mel(low), _kaldi_mel(high)
    delta = (hi - lo) / (n_bins + 1)
    left = lo + np.arange(n_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    up = (m[None] - left) / (center - left)
    down = (right - m[None]) / (right - center)
    return np.maximum(0.0, np.minimum(up, down)) * ((m[None] > left) & (m[None] < right))


def slaney_mel_banks(n_mels: int, n_fft: int, sr: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax) (Slaney scale and area norm)
    -> [n_mels, n_fft // 2 + 1]."""
    fmax = sr / 2 if fmax is None else fmax

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        logstep = np.log(6.4) / 27.0
        return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, lin)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        logstep = np.log(6.4) / 27.0
        return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * (200.0 / 3))

    fft_freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return w * (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]


# ------------------------------------------------------------------- features
def kaldi_fbank(wav: np.ndarray, sr: int = 16000, n_bins: int = 80) -> np.ndarray:
    """Kaldi fbank (torchaudio.compliance.kaldi.fbank defaults, dither 0) -> [frames, n_bins]."""
    wav = np.asarray(wav, dtype=np.float64)
    win, hop = int(sr * 0.025), int(sr * 0.010)
    if len(wav) < win:
        return np.zeros((0, n_bins), np.float32)
    n = 1 + (len(wav) - win) // hop  # snip_edges
    frames = np.lib.stride_tricks.sliding_window_view(wav, win)[::hop][:n].copy()
    frames -= frames.mean(axis=1, keepdims=True)            # remove DC offset
    frames[:, 1:] -= 0.97 * frames[:, :-1]                  # pre-emphasis (first sample
    frames[:, 0] -= 0.97 * frames[:, 0]                     # uses itself, as Kaldi)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))) ** 0.85
    frames *= povey
    n_fft = 1 << int(np.ceil(np.log2(win)))
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2
    mel = power[:, : n_fft // 2] @ kaldi_mel_banks(n_bins, n_fft, sr).T
    return np.log(np.maximum(mel, np.finfo(np.float32).eps)).astype(np.float32)


def whisper_log_mel(wav16k: np.ndarray, n_mels: int = 128) -> np.ndarray:
    """Whisper log_mel_spectrogram -> [n_mels, frames] (frames = len // 160)."""
    x = torch.from_numpy(np.asarray(wav16k, dtype=np.float32))
    spec = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)
    power = spec[:, :-1].abs() ** 2
    mel = torch.from_numpy(slaney_mel_banks(n_mels, 400, 16000)).float() @ power
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).numpy()


def prompt_mel(wav24k: np.ndarray) -> np.ndarray:
    """The flow's prompt features (Matcha mel_spectrogram config of cosyvoice2.yaml)
    -> [frames, 80] at 50 Hz."""
    n_fft, hop = 1920, 480
    x = torch.from_numpy(np.asarray(wav24k, dtype=np.float32))[None, None]
    pad = (n_fft - hop) // 2
    x = torch.nn.functional.pad(x, (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(x, n_fft, hop, n_fft, window=torch.hann_window(n_fft), center=False,
                      return_complex=True)
    mag = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = torch.from_numpy(slaney_mel_banks(80, n_fft, 24000, 0.0, 8000.0)).float() @ mag
    return torch.log(torch.clamp(mel, min=1e-5)).T.numpy()


# ------------------------------------------------------------------- ONNX models
def _session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def require_onnx(model_dir: str | Path) -> tuple[Path, Path]:
    """Paths of the two ONNX models; one FileNotFoundError naming those missing."""
    model_dir = Path(model_dir)
    paths = (model_dir / CAMPPLUS, model_dir / SPEECH_TOKENIZER)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"speaker registration needs {', '.join(missing)} in {model_dir} "
                                f"(from the official CosyVoice2 release)")
    return paths


def build_speaker(model_dir: str | Path, name: str, wav: np.ndarray, sr: int,
                  prompt_text_ids: list[int]) -> Speaker:
    """Reference clip (mono float, <= 30 s) + its transcript ids -> Speaker, as upstream's
    frontend_zero_shot: x-vector, speech tokens, prompt mel trimmed to 2 frames per token."""
    campplus, tokenizer = require_onnx(model_dir)
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    w16 = resample(wav, sr, 16000)
    if len(w16) > 30 * 16000:
        raise ValueError("reference clip longer than 30 s")
    fb = kaldi_fbank(w16)
    fb = fb - fb.mean(axis=0, keepdims=True)
    sess = _session(campplus)
    emb = sess.run(None, {sess.get_inputs()[0].name: fb[None]})[0].reshape(1, -1)
    mel = whisper_log_mel(w16)
    sess = _session(tokenizer)
    ins = sess.get_inputs()
    tokens = sess.run(None, {ins[0].name: mel[None], ins[1].name: np.array([mel.shape[1]], np.int32)})[0]
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    feat = prompt_mel(resample(wav, sr, 24000))
    n = min(feat.shape[0] // 2, len(tokens))
    return Speaker(name, torch.from_numpy(emb).float(), tuple(prompt_text_ids), tuple(tokens[:n]),
                   torch.from_numpy(feat[: 2 * n]).float()[None])

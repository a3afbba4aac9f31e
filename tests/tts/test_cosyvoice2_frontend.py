"""Speaker front-end features, checked on their own (the conformance model has no ONNX
models, so the embedding/tokenizer runs themselves are not exercised here)."""
from __future__ import annotations

import numpy as np
import pytest

from tts.cosyvoice2.frontend import (kaldi_fbank, kaldi_mel_banks, prompt_mel, require_onnx,
                                     slaney_mel_banks, whisper_log_mel)


def tone(freq: float, sr: int, secs: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * secs)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_kaldi_fbank_frames_follow_snip_edges_25ms_10ms():
    assert kaldi_fbank(np.zeros(16000, np.float32)).shape == (98, 80)  # 1 + (16000 - 400) // 160
    assert kaldi_fbank(np.zeros(399, np.float32)).shape == (0, 80)


def test_kaldi_fbank_silence_is_log_epsilon():
    assert np.allclose(kaldi_fbank(np.zeros(4000, np.float32)), np.log(np.finfo(np.float32).eps))


def test_kaldi_fbank_ignores_dc_and_scales_as_power():
    x = tone(440, 16000) + 0.01 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    f = kaldi_fbank(x)
    assert np.allclose(kaldi_fbank(x + 0.3), f, atol=1e-4)        # DC removed per frame
    assert np.allclose(kaldi_fbank(2 * x), f + np.log(4), atol=1e-4)  # power spectrum


def test_kaldi_fbank_tone_peaks_in_the_bin_covering_its_frequency():
    banks = kaldi_mel_banks(80, 512, 16000)
    for freq in (300.0, 1000.0, 3000.0):
        peak = kaldi_fbank(tone(freq, 16000)).mean(axis=0).argmax()
        assert peak == banks[:, int(round(freq * 512 / 16000))].argmax()


def test_kaldi_mel_banks_are_triangles_between_20hz_and_nyquist():
    b = kaldi_mel_banks(80, 512, 16000)
    assert b.shape == (80, 256) and b.min() >= 0 and b.max() <= 1
    assert b[:, 0].sum() == 0  # DC (0 Hz) lies below the 20 Hz low edge


def test_slaney_mel_banks_equal_librosa_filters_shipped_with_whisper():
    """openai-whisper ships librosa.filters.mel(16000, 400, n) tables: an independent reference."""
    audio = pytest.importorskip("whisper.audio")
    for n in (80, 128):
        assert np.abs(slaney_mel_banks(n, 400, 16000) - audio.mel_filters("cpu", n).numpy()).max() < 1e-7


def test_whisper_log_mel_equals_openai_whisper():
    audio = pytest.importorskip("whisper.audio")
    import torch
    x = tone(440, 16000, 1.5) + 0.05 * np.random.default_rng(0).standard_normal(24000).astype(np.float32)
    ref = audio.log_mel_spectrogram(torch.from_numpy(x), n_mels=128).numpy()
    assert np.abs(whisper_log_mel(x) - ref).max() < 1e-5


def test_whisper_log_mel_shape_and_dynamic_range():
    m = whisper_log_mel(tone(1000, 16000))
    assert m.shape == (128, 100)
    assert m.max() - m.min() <= 2.0 + 1e-6  # clamp at max - 8 (log10), then / 4


def test_prompt_mel_is_50hz_and_log_clamped():
    m = prompt_mel(tone(200, 24000))
    assert m.shape == (50, 80)
    assert m.min() >= np.log(1e-5) - 1e-6
    assert m.mean(axis=0).argmax() < 10  # a 200 Hz tone lands in a low mel bin


def test_missing_onnx_models_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="campplus.onnx, speech_tokenizer_v2.onnx"):
        require_onnx(tmp_path)
    (tmp_path / "campplus.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        require_onnx(tmp_path)
    assert "campplus" not in str(e.value).split(" in ")[0]

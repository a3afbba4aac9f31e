"""The streaming log-mel is Whisper's log-mel of the whole utterance, chunk by chunk."""
import numpy as np
import pytest
import torch
import whisper

from speech_encoder.mel import HOP, StreamingMel


def utterance(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.5 * t / seconds))
    return (tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("chunk_ms", [80, 160, 320, 70])
def test_after_every_chunk_the_window_equals_whispers_spectrogram_of_the_audio_so_far(chunk_ms):
    x = utterance(2.13)
    mel = StreamingMel()
    step = 16 * chunk_ms
    for end in range(step, len(x) + step, step):
        mel.push(x[end - step:end])
        so_far = x[:end]
        if len(so_far) <= 200:
            continue
        full = whisper.log_mel_spectrogram(torch.from_numpy(so_far))
        got = mel.window()
        assert got.shape == full.shape == (80, len(so_far) // HOP)
        assert torch.allclose(got, full, atol=1e-4)


def test_final_frames_are_computed_once_and_never_change():
    x = utterance(1.5)
    mel = StreamingMel()
    mel.push(x[:8000])
    before = mel.raw()[:, :mel.n_final].clone()
    mel.push(x[8000:])
    assert torch.equal(mel.raw()[:, :before.shape[1]], before)


def test_a_trimmed_window_is_clamped_over_its_own_frames_and_old_audio_is_forgotten():
    x = utterance(6.0)
    x[:16000] *= 20  # a loud first second sets the global maximum
    mel = StreamingMel()
    for i in range(0, len(x), 2560):
        mel.push(x[i:i + 2560])
        mel.drop_before(mel.n_final - 200)  # keep about 2 s of frames
    raw_full = torch.clamp(whisper.audio.mel_filters("cpu", 80) @ torch.stft(
        torch.from_numpy(x), 400, 160, window=torch.hann_window(400), return_complex=True)[..., :-1].abs() ** 2,
        min=1e-10).log10()
    start = mel.first_frame
    window = raw_full[:, start:]
    expected = (torch.maximum(window, window.max() - 8) + 4) / 4
    assert torch.allclose(mel.window(start), expected, atol=1e-4)
    assert mel.raw().shape[1] <= 220
    assert len(mel._tail) < 2 * 2560

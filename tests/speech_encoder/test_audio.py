"""WAV reading (no ffmpeg here) and resampling."""
import struct

import numpy as np
import pytest

from speech_encoder.audio import AudioFormatError, load_audio, read_wav, resample, write_wav


def wav_bytes(payload: bytes, tag: int, channels: int, rate: int, bits: int) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(rate, seconds=0.5, hz=440.0):
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def dominant_hz(x, rate):
    spectrum = np.abs(np.fft.rfft(x))
    return np.argmax(spectrum) * rate / len(x)


@pytest.mark.parametrize("bits,tag,dtype", [(16, 1, "<i2"), (32, 1, "<i4"), (32, 3, "<f4"), (64, 3, "<f8")])
def test_pcm_and_float_wavs_read_back_to_the_same_samples(tmp_path, bits, tag, dtype):
    x = tone(8000)
    if tag == 3:
        raw = x.astype(dtype).tobytes()
    else:
        raw = (x * (2 ** (bits - 1) - 1)).astype(dtype).tobytes()
    path = tmp_path / "a.wav"
    path.write_bytes(wav_bytes(raw, tag, 1, 8000, bits))
    y, rate = read_wav(path)
    assert rate == 8000 and y.shape == (len(x), 1)
    assert np.max(np.abs(y[:, 0] - x)) < 1e-3


def test_24_bit_stereo_is_read_and_mixed_to_mono(tmp_path):
    x = tone(44100, 0.2)
    ints = (x * (2 ** 23 - 1)).astype(np.int32)
    frames = np.stack([ints, -ints * 0], axis=1).reshape(-1)
    raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in frames)
    path = tmp_path / "s.wav"
    path.write_bytes(wav_bytes(raw, 1, 2, 44100, 24))
    y, rate = read_wav(path)
    assert y.shape == (len(x), 2) and rate == 44100
    mono = load_audio(path, 44100)
    assert np.max(np.abs(mono - x / 2)) < 1e-3


def test_odd_rates_resample_to_16k_keeping_pitch_and_duration(tmp_path):
    for rate in (8000, 11025, 22050, 44100, 48000):
        path = tmp_path / f"t{rate}.wav"
        write_wav(path, tone(rate, 1.0, 440.0), rate)
        y = load_audio(path, 16000)
        assert abs(len(y) - 16000) <= 1
        assert abs(dominant_hz(y, 16000) - 440.0) < 2.0


def test_resampling_to_the_same_rate_is_identity():
    x = tone(16000)
    assert np.array_equal(resample(x, 16000, 16000), x)


@pytest.mark.parametrize("content,message", [
    (b"", "not a WAV"), (b"ID3\x03hello", "not a WAV"),
    (b"RIFF\x10\x00\x00\x00WAVEdata\x00\x00\x00\x00", "missing fmt"),
])
def test_files_that_are_not_wavs_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFormatError, match=message):
        read_wav(path)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AudioFormatError, match="cannot read"):
        read_wav(tmp_path / "nope.wav")


def test_a_truncated_data_chunk_keeps_the_whole_samples_it_has(tmp_path):
    x = tone(16000, 0.1)
    full = wav_bytes((x * 32767).astype("<i2").tobytes(), 1, 1, 16000, 16)
    path = tmp_path / "cut.wav"
    path.write_bytes(full[:-101])  # cut mid-sample
    y, _ = read_wav(path)
    assert len(y) == len(x) - 51

"""48 kHz <-> 16 kHz conversion, frame by frame."""
import numpy as np
from av import AudioFrame

from agent.config import SAMPLE_RATE
from web.audio import RTC_RATE, Decimator, Interpolator, frame_to_mono, mono_to_frames


def tone(hz, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_decimating_frame_by_frame_equals_decimating_the_whole_signal():
    x = np.random.default_rng(0).standard_normal(RTC_RATE).astype(np.float32) * 0.1
    whole = Decimator()(x)
    stream, pieces = Decimator(), []
    for size in [960, 480, 7, 1000, 953] * 20:  # odd frame sizes too
        pieces.append(stream(x[:size]))
        x = x[size:]
    streamed = np.concatenate(pieces + [stream(x)])
    assert len(whole) == RTC_RATE // 3
    np.testing.assert_allclose(streamed, whole, atol=1e-6)


def test_interpolating_a_chunk_gives_exactly_three_times_the_samples_and_keeps_a_tone():
    up = Interpolator()
    chunks = [up(c) for c in np.split(tone(440, 1.0, SAMPLE_RATE), 10)]
    assert all(len(c) == 3 * SAMPLE_RATE // 10 for c in chunks)
    y = np.concatenate(chunks)[RTC_RATE // 10:]  # past the filter's start-up
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * RTC_RATE / len(y) - 440) < 2
    assert abs(np.sqrt(np.mean(y ** 2)) - 0.5 / np.sqrt(2)) < 0.02  # unity gain


def test_a_round_trip_through_48_khz_preserves_speech_band_audio():
    x = tone(1000, 1.0, SAMPLE_RATE) + tone(3000, 1.0, SAMPLE_RATE) * 0.5
    back = Decimator()(Interpolator()(x))
    delay = 32  # the two filters' group delay: 2 x 48 samples at 48 kHz
    err = back[800 + delay:] - x[800:len(back) - delay]
    assert np.sqrt(np.mean(err ** 2)) < 0.01


def test_frames_carry_pts_and_decode_back_to_the_same_samples():
    x = tone(300, 0.04, RTC_RATE)
    frames = mono_to_frames(x, first_pts=960 * 5)
    assert [f.pts for f in frames] == [4800, 5760] and all(f.samples == 960 for f in frames)
    back = np.concatenate([frame_to_mono(f) for f in frames])
    np.testing.assert_allclose(back, x, atol=1 / 16000)
    stereo = AudioFrame.from_ndarray(np.repeat((x[:960] * 32767).astype(np.int16), 2)[None], format="s16",
                                     layout="stereo")
    np.testing.assert_allclose(frame_to_mono(stereo), x[:960], atol=1 / 16000)


"""48 kHz <-> 16 kHz conversion and the placing of user audio on the chunk clock."""
import numpy as np
from av import AudioFrame

from agent.config import SAMPLE_RATE
from web.audio import RTC_RATE, ChunkAssembler, Decimator, Interpolator, frame_to_mono, mono_to_frames


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


def test_audio_lands_in_the_chunk_of_its_media_time_whatever_the_arrival_order():
    n = 160
    box = ChunkAssembler(n)
    box.put(0.015, np.full(80, 2.0, np.float32))  # second half of chunk 1 (chunk = 10 ms here)
    box.put(0.010, np.full(80, 1.0, np.float32))  # first half, arriving after
    assert not box.take(0).any() and box.missing_chunks == 1
    np.testing.assert_array_equal(box.take(1), np.r_[np.ones(80), np.full(80, 2.0)])


def test_audio_after_its_tick_is_dropped_and_counted_and_a_straddling_piece_is_split():
    box = ChunkAssembler(100)
    box.take(0)
    box.put(0.0, np.ones(50, np.float32))  # chunk 0 is gone: too late
    box.put(100 / SAMPLE_RATE * 1.5, np.ones(100, np.float32))  # half in chunk 1, half in chunk 2
    assert box.late_samples == 50
    assert box.take(1)[50:].all() and box.take(2)[:50].all() and not box.take(2 + 1).any()


def test_memory_is_bounded_when_audio_comes_from_far_ahead():
    box = ChunkAssembler(100, max_ahead=4)
    box.put(10.0, np.ones(1000, np.float32))
    assert box.early_samples == 1000 and not box.take(0).any()

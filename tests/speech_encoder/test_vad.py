"""Endpointing: turn boundaries where speech really starts and stops."""
import numpy as np

from agent.config import SAMPLE_RATE
from speech_encoder.vad import FRAME_SAMPLES, Endpointer


def run(endpointer: Endpointer, audio: np.ndarray):
    events = []
    for i in range(0, len(audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES):
        events += endpointer.process(audio[i:i + FRAME_SAMPLES], i / SAMPLE_RATE)
    return events


def silence(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def test_silence_and_low_noise_open_no_turn():
    rng = np.random.default_rng(0)
    audio = np.concatenate([silence(2), 0.001 * rng.standard_normal(SAMPLE_RATE * 2).astype(np.float32)])
    assert run(Endpointer(), audio) == []


def test_one_utterance_gives_one_start_and_one_end_near_the_true_edges(speech):
    voice = speech("What is the capital of France?")
    voiced = np.flatnonzero(np.abs(voice) > 0.02)
    true_start, true_end = 1.0 + voiced[0] / SAMPLE_RATE, 1.0 + voiced[-1] / SAMPLE_RATE
    events = run(Endpointer(end_ms=400), np.concatenate([silence(1.0), voice, silence(1.5)]))
    assert [e.kind for e in events] == ["start", "end"]
    start, end = events
    assert abs(start.t - true_start) < 0.15
    assert abs(end.t - true_end) < 0.15
    assert end.decided_at - end.t >= 0.4 - 1e-6  # the decision waits out the silence


def test_a_pause_shorter_than_the_endpoint_does_not_end_the_turn(speech):
    a, b = speech("I would like to book"), speech("a table for two")
    events = run(Endpointer(end_ms=700), np.concatenate([silence(0.5), a, silence(0.3), b, silence(1.0)]))
    assert [e.kind for e in events] == ["start", "end"]

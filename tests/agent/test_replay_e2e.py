"""End to end on the real models: a spoken question gets a spoken answer.

The user's question is synthesized with flite, replayed in real time through
the whole pipeline (webrtcvad, Whisper tiny.en, Qwen2.5-0.5B, Piper), and the
agent's channel of conversation.wav is transcribed by Whisper again.
"""
import json

import numpy as np
import pytest

from agent.config import SAMPLE_RATE
from agent.transports.replay import run_replay
from speech_encoder.audio import read_wav

pytestmark = pytest.mark.e2e

REQUIRED_EVENTS = {"user_speech_start", "user_speech_end", "transcript", "agent_speech_start",
                   "agent_speech_end", "turn"}


def silence(seconds):
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


@pytest.fixture(scope="module")
def france(engine, tmp_path_factory):
    from tests.conftest import synthesize
    from speech_encoder.audio import load_audio
    import asyncio

    tmp = tmp_path_factory.mktemp("france")
    question = load_audio(synthesize("What is the capital of France?", tmp / "q.wav"), SAMPLE_RATE)
    out = tmp / "out"
    summary = asyncio.run(run_replay(engine, np.concatenate([silence(0.5), question]), out))
    return out, summary


def test_the_answer_is_spoken_and_names_paris(france, asr):
    out, _ = france
    stereo, rate = read_wav(out / "conversation.wav")
    assert rate == SAMPLE_RATE and stereo.shape[1] == 2
    heard = asr.transcribe(stereo[:, 1]).text
    assert "paris" in heard.lower(), heard


def test_the_agent_does_not_start_before_the_user_has_finished(france):
    out, summary = france
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    user_end = max(e["t"] for e in events if e["type"] == "user_speech_end")
    agent_start = min(e["t"] for e in events if e["type"] == "agent_speech_start")
    assert agent_start > user_end
    stereo, _ = read_wav(out / "conversation.wav")
    before = stereo[: int(user_end * SAMPLE_RATE), 1]
    assert np.max(np.abs(before)) == 0.0  # the agent's channel is silent until then


def test_the_outputs_carry_every_event_type_and_the_turn_latency(france):
    out, summary = france
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert REQUIRED_EVENTS <= {e["type"] for e in events}
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    assert next(e for e in events if e["type"] == "agent_speech_end")["reason"] == "finished"
    (turn,) = summary["turns"]
    assert "capital of france" in turn["user_text"].lower()
    assert turn["latency"] == pytest.approx(turn["agent_start"] - turn["user_end"], abs=1e-3)
    assert 0 < turn["latency"] < 10
    assert json.loads((out / "summary.json").read_text())["turns"][0]["index"] == 1


def test_both_channels_share_one_timeline(france):
    out, summary = france
    stereo, _ = read_wav(out / "conversation.wav")
    assert len(stereo) / SAMPLE_RATE == pytest.approx(summary["duration_s"], abs=0.01)
    # The user's question sits where it was played: after the 0.5 s lead-in.
    voiced = np.flatnonzero(np.abs(stereo[:, 0]) > 0.02)
    assert voiced[0] / SAMPLE_RATE >= 0.5


def test_without_streaming_the_whole_turn_is_transcribed_once_it_ends_and_answered(engine, tmp_path):
    import asyncio
    import dataclasses

    from speech_encoder.audio import load_audio
    from tests.conftest import synthesize

    whole = engine.sharing(config=dataclasses.replace(engine.config, streaming=False))  # the other listening path
    try:
        question = load_audio(synthesize("What is the capital of France?", tmp_path / "q.wav"), SAMPLE_RATE)
        summary = asyncio.run(run_replay(whole, np.concatenate([silence(0.5), question]), tmp_path / "out"))
    finally:
        whole.close()
    (turn,) = summary["turns"]
    assert "paris" in turn["agent_text"].lower()
    assert turn["prefill_tokens"] > 0  # the user's words were prefilled after the turn, not during it
    events = [json.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert not any(e["type"] == "partial_transcript" for e in events)

"""bench duplex end to end: one scenario per category through replay, on the real models.

What the agent does depends on the machine (a loaded CPU answers late and its
voice may stall), so these tests check the benchmark, not the agent: every
category is generated, played, recorded on one timeline and scored, and the
report has its rows. Only the plainest behaviour is asserted: a question is
answered, and the answer is about it.
"""
import json

import pytest

from agent.config import SAMPLE_RATE
from bench import duplex
from bench.duplex_scenarios import CATEGORIES, Speaker, generate
from speech_encoder.audio import read_wav

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bench_run(engine, tmp_path_factory):
    out = tmp_path_factory.mktemp("duplex")
    scenarios = generate(1, Speaker(engine.config.cache_dir))
    results = duplex.run_all(engine, scenarios, out, machine="test machine")
    return out, scenarios, results


def scored(out, scenario):
    return json.loads((out / scenario.category / scenario.id / "score.json").read_text())


def test_every_category_is_played_scored_and_reported(bench_run):
    out, scenarios, results = bench_run
    assert [s.category for s in scenarios] == list(CATEGORIES)
    assert set(results["metrics"]) == set(CATEGORIES)
    assert all(results["metrics"][c]["n"] + results["metrics"][c]["n_not_played"] == 1 for c in CATEGORIES)
    table = (out / "results.md").read_text()
    for label in ("TOR (lower is better)", "resume rate", "response latency p50, s", "stop latency p90, s",
                  "no stop and no reply"):
        assert label in table
    assert "0.642" in table and "1.409" in table  # published figures beside ours
    assert json.loads((out / "results.json").read_text()) == results


def test_the_user_channel_holds_the_script_where_the_summary_says(bench_run):
    out, scenarios, _ = bench_run
    for s in scenarios:
        run = out / s.category / s.id
        stereo, rate = read_wav(run / "conversation.wav")
        assert rate == SAMPLE_RATE and stereo.shape[1] == 2
        first_word = scored(out, s)["user_speech"][0][0]
        start = json.loads((run / "summary.json").read_text())["user_utterance_starts"][0]
        assert abs(first_word - start) < 0.2, s.id


def test_the_pauses_inside_a_long_turn_are_heard_as_pauses(bench_run):
    out, scenarios, _ = bench_run
    pause = next(s for s in scenarios if s.category == "pause")
    start = json.loads((out / "pause" / pause.id / "summary.json").read_text())["user_utterance_starts"][0]
    user = scored(out, pause)["user_speech"]
    gaps = [(a[1] - start, b[0] - start) for a, b in zip(user, user[1:])]
    for lo, hi in pause.parts[0].pauses:
        assert any(abs(g0 - lo) < 0.2 and abs(g1 - hi) < 0.2 for g0, g1 in gaps), (lo, hi, gaps)


def test_a_plain_question_is_answered_and_the_reply_is_about_it(bench_run, engine):
    out, scenarios, _ = bench_run
    question = next(s for s in scenarios if s.category == "turntaking")
    result = scored(out, question)["result"]
    assert result["took_turn"] and result["latency_s"] > 0
    stereo, _ = read_wav(out / "turntaking" / question.id / "conversation.wav")
    reply = stereo[int((scored(out, question)["user_speech"][-1][1]) * SAMPLE_RATE):, 1]
    assert "paris" in engine.asr.transcribe(reply).text.lower()


def test_each_result_has_the_fields_its_metrics_need(bench_run):
    out, scenarios, _ = bench_run
    for s in scenarios:
        result = scored(out, s)["result"]
        if result is None:
            continue  # the agent never spoke, so the part waiting for it never played
        kind = duplex.score.RESULT_TYPES[s.category]
        assert duplex.score.from_dict(s.category, result) == kind(**result)
        if s.category == "interruption" and result["took_turn"]:
            assert result["latency_s"] is not None and result["stop_s"] is not None

"""Turn-taking metrics on hand-made two-channel signals whose events are known.

The conversation below, in seconds (A on the left channel, B on the right):

    A  0.5-2.0   2.5-4.0          5.6---------7.5                 (7.0-7.1: a 0.1 s breath inside the IPU)
    B                    4.6---6.0     6.4-6.7         11.0-12.0   (end of recording: 12.5)

pause 2.0-2.5 (A); gaps 4.0-4.6 (A->B) and 7.5-11.0 (A->B, also a deadlock);
overlaps 5.6-6.0 (A takes the floor: an interruption) and 6.4-6.7 (B's
backchannel inside A's IPU: the floor stays with A).
"""
import numpy as np
import pytest

from agent.config import SAMPLE_RATE
from bench.turntaking import Segment, analyze, analyze_audio, describe, ipus

A_SPANS = [(0.5, 2.0), (2.5, 4.0), (5.6, 7.0), (7.1, 7.5)]
B_SPANS = [(4.6, 6.0), (6.4, 6.7), (11.0, 12.0)]
DURATION = 12.5


def voice(spans, duration=DURATION):
    """A vowel-like harmonic sound over each span, digital silence elsewhere."""
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(130 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 20))
    out = np.zeros_like(t)
    for s, e in spans:
        sl = slice(int(s * SAMPLE_RATE), int(e * SAMPLE_RATE))
        out[sl] = tone[sl]
    return (0.1 * out / np.abs(tone).max()).astype(np.float32)


def segs(spans, speaker):
    return [Segment(s, e, speaker) for s, e in spans]


@pytest.fixture(scope="module")
def conversation():
    return analyze_audio(voice(A_SPANS), voice(B_SPANS))


def spans(segments):
    return [(round(s.start, 2), round(s.end, 2)) for s in segments]


def test_ipus_join_short_silences_and_match_the_voiced_spans(conversation):
    assert spans(conversation.ipus["A"]) == [(0.5, 2.0), (2.5, 4.0), (5.6, 7.5)]
    assert spans(conversation.ipus["B"]) == [(4.6, 6.0), (6.4, 6.7), (11.0, 12.0)]


def test_pauses_are_silences_between_one_speakers_ipus(conversation):
    assert spans(conversation.pauses) == [(2.0, 2.5)]


def test_gaps_are_silences_between_speakers(conversation):
    assert spans(conversation.gaps) == [(4.0, 4.6), (7.5, 11.0)]


def test_overlaps_are_where_both_speak(conversation):
    assert spans(conversation.overlaps) == [(5.6, 6.0), (6.4, 6.7)]


def test_floor_transfers_carry_their_offset_and_backchannels_are_not_transfers(conversation):
    got = [(t.source, t.target, round(t.fto, 2)) for t in conversation.transfers]
    assert got == [("A", "B", 0.6), ("B", "A", -0.4), ("A", "B", 3.5)]
    assert len(conversation.interruptions) == 1


def test_a_long_joint_silence_is_a_deadlock_and_the_lead_in_is_not(conversation):
    assert spans(conversation.deadlocks) == [(7.5, 11.0)]
    assert conversation.metrics()["deadlock_kinds"] == {"pause": 0, "gap": 1, "end": 0}


def test_metrics_report_rates_and_distributions(conversation):
    m = conversation.metrics()
    assert m["duration_s"] == pytest.approx(DURATION)
    assert m["ipu"]["count"] == 6 and m["ipu"]["per_min"] == pytest.approx(6 / (DURATION / 60), abs=0.01)
    assert m["gap"]["median"] == pytest.approx(2.05, abs=0.02)
    assert m["fto"]["median"] == pytest.approx(0.6, abs=0.02)
    assert m["fto_s"] == pytest.approx([0.6, -0.4, 3.5], abs=0.02)
    assert (m["floor_transfers"], m["interruptions"], m["talk_over_episodes"], m["talk_over_loops"],
            m["deadlocks"]) == (3, 1, 0, 0, 1)


def test_ipu_rules_on_frames():
    frames = np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
    # At 100 ms frames every silence here is long enough to split IPUs. At 20 ms frames,
    # frames 1-2 (40 ms) are a click and are dropped; 17-19 and 28 are 160 ms apart: one IPU.
    assert spans(ipus(frames, frame_s=0.1)) == [(0.1, 0.3), (1.7, 2.0), (2.8, 2.9)]
    assert spans(ipus(frames, frame_s=0.02)) == [(0.34, 0.58)]


def test_repeated_long_overlaps_are_talk_overs_and_a_loop():
    a = segs([(0.0, 2.0), (4.0, 6.0), (8.0, 10.0)], "A")
    b = segs([(0.8, 2.5), (4.5, 6.5), (8.5, 9.6), (30.0, 31.0)], "B")
    result = analyze(a, b, 32.0)
    assert spans(result.talk_overs) == [(0.8, 2.0), (4.5, 6.0), (8.5, 9.6)]
    assert [spans(run) for run in result.talk_over_loops()] == [[(0.8, 2.0), (4.5, 6.0), (8.5, 9.6)]]
    # The silence 10.0-30.0 is one deadlock; the trailing second after 31.0 is not.
    assert spans(result.deadlocks) == [(10.0, 30.0)]


def test_a_silence_running_into_the_end_is_a_deadlock():
    result = analyze(segs([(0.0, 1.0)], "A"), segs([(1.2, 2.0)], "B"), 6.0)
    assert spans(result.deadlocks) == [(2.0, 6.0)]
    assert result.metrics()["deadlock_kinds"] == {"pause": 0, "gap": 0, "end": 1}
    assert spans(result.gaps) == [(1.0, 1.2)]


def test_describe_gives_percentiles():
    d = describe([float(x) for x in range(1, 11)], minutes=0.5)
    assert d["count"] == 10 and d["per_min"] == 20
    assert (d["mean"], d["median"], d["p10"], d["p90"], d["total_s"]) == (5.5, 5.5, 1.9, 9.1, 55.0)
    assert describe([], 1.0)["median"] is None


def test_a_speaker_stalling_mid_turn_is_a_deadlock_of_kind_pause():
    result = analyze(segs([(0.0, 1.0), (4.5, 6.0)], "A"), segs([(6.3, 7.0)], "B"), 7.0)
    assert spans(result.pauses) == [(1.0, 4.5)] and spans(result.deadlocks) == [(1.0, 4.5)]
    assert result.metrics()["deadlock_kinds"] == {"pause": 1, "gap": 0, "end": 0}


def test_a_silent_channel_is_still_a_speaker_with_no_ipus():
    result = analyze_audio(voice(A_SPANS), voice([]))
    assert list(result.ipus) == ["A", "B"] and result.ipus["B"] == []
    assert result.transfers == [] and result.metrics()["ipu_per_speaker"] == {"A": 3, "B": 0}

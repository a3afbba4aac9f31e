"""The scoring of bench duplex, on two-channel recordings made by hand with known answers.

Each recording is real speech (flite) placed at known times on a user and an
agent track; silero-vad reads it back as the benchmark does. Times are
checked to 0.15 s: silero pads and trims a little around words.
"""
import numpy as np
import pytest

from agent.config import SAMPLE_RATE
from bench import duplex_score as score

TOL = 0.15


@pytest.fixture(scope="module")
def vad():
    return score.SileroVad()


@pytest.fixture
def phrases(speech):
    """Trimmed flite speech: phrases('What is two plus two?') -> float32 16 kHz."""
    from bench.duplex_scenarios import trim

    return lambda text: trim(speech(text))


class Recording:
    """A two-channel timeline; speech is placed on it at known times (s)."""

    def __init__(self, seconds: float):
        self.user = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
        self.agent = np.zeros_like(self.user)

    def put(self, track: np.ndarray, audio: np.ndarray, at: float) -> tuple[float, float]:
        i = int(at * SAMPLE_RATE)
        track[i:i + len(audio)] += audio[:len(track) - i]
        return at, at + len(audio) / SAMPLE_RATE

    def say(self, audio, at):
        return self.put(self.user, audio, at)

    def answer(self, audio, at):
        return self.put(self.agent, audio, at)

    def spans(self, vad):
        return vad.spans(self.user), vad.spans(self.agent)


def talk(phrases, *texts, gap=0.25):
    """Agent speech of several clauses with Piper-like pauses between them."""
    pause = np.zeros(int(gap * SAMPLE_RATE), np.float32)
    return np.concatenate([x for t in texts for x in (phrases(t), pause)][:-1])


LONG_ANSWER = ("The ocean covers most of our planet,", "and it holds nearly all of its water,",
               "from the warm shallow seas near the equator", "to the cold dark trenches far below.")


def test_spans_closer_than_the_agent_gap_are_one_stretch():
    assert score.merge([(0.0, 1.0), (1.5, 2.0), (3.0, 4.0)]) == [(0.0, 2.0), (3.0, 4.0)]
    assert score.within([(0.0, 1.0), (2.0, 3.0), (5.0, 6.0)], (0.5, 4.0)) == (0.5, 3.0)
    assert score.within([(5.0, 6.0)], (0.0, 4.0)) is None


# -- pause handling ----------------------------------------------------------------------------------

@pytest.fixture
def long_turn(phrases):
    """The user speaks 0.5 s .. about 6 s with two pauses of 0.8 s; returns (recording, turn, pauses)."""
    rec = Recording(14.0)
    a = rec.say(phrases("I was wondering if you could help me plan"), 0.5)
    b = rec.say(phrases("a dinner party for about eight people"), a[1] + 0.8)
    c = rec.say(phrases("who all really like spicy food."), b[1] + 0.8)
    return rec, (0.5, c[1]), [(a[1], b[0]), (b[1], c[0])]


def test_an_agent_that_waits_for_the_end_of_a_long_turn_does_not_take_over(vad, phrases, long_turn):
    rec, turn, _ = long_turn
    rec.answer(phrases("Sure, what kind of food do you like?"), turn[1] + 0.7)
    result = score.score_pause(*rec.spans(vad), turn)
    assert result == score.PauseResult(took_over=False, spoke=False, agent_speech_s=0.0)


def test_an_agent_that_answers_in_a_pause_takes_over(vad, phrases, long_turn):
    rec, turn, pauses = long_turn
    rec.answer(phrases("Sure, I can help you plan a party."), pauses[0][0] + 0.3)
    result = score.score_pause(*rec.spans(vad), turn)
    assert result.took_over and result.spoke and result.agent_speech_s > 1.0


def test_a_short_sound_in_a_pause_is_speech_but_no_takeover(vad, phrases, long_turn):
    rec, turn, pauses = long_turn
    rec.answer(phrases("Yes."), pauses[1][0] + 0.2)
    result = score.score_pause(*rec.spans(vad), turn, words=lambda span: "Yes.")
    assert result.spoke and not result.took_over


# -- backchannel --------------------------------------------------------------------------------------

def test_an_agent_that_talks_through_a_backchannel_resumes_without_a_gap(vad, phrases):
    rec = Recording(12.0)
    answer = rec.answer(talk(phrases, *LONG_ANSWER), 1.0)
    bc = rec.say(phrases("yeah"), 3.0)
    result = score.score_backchannel(*rec.spans(vad), bc)
    assert answer[1] > bc[1] + 1.0
    assert result.valid and result.resumed and result.gap_s < 0.5


def test_an_agent_that_stops_at_a_backchannel_has_not_resumed_and_the_gap_is_measured(vad, phrases):
    rec = Recording(12.0)
    first = rec.answer(phrases("The ocean covers most of our planet,"), 1.0)
    bc = rec.say(phrases("yeah"), first[1] - 0.5)
    again = rec.answer(phrases("Sorry, go on."), first[1] + 2.5)
    result = score.score_backchannel(*rec.spans(vad), bc)
    assert result.valid and not result.resumed
    assert result.gap_s == pytest.approx(again[0] - first[1], abs=TOL)


def test_a_backchannel_after_the_answer_ended_is_not_counted(vad, phrases):
    rec = Recording(8.0)
    first = rec.answer(phrases("The ocean is big."), 0.5)
    bc = rec.say(phrases("right"), first[1] + 1.0)
    assert not score.score_backchannel(*rec.spans(vad), bc).valid


# -- smooth turn-taking -------------------------------------------------------------------------------

def test_a_reply_after_a_question_takes_the_turn_with_its_latency(vad, phrases):
    rec = Recording(8.0)
    q = rec.say(phrases("What is the capital of France?"), 0.5)
    rec.answer(phrases("The capital of France is Paris."), q[1] + 0.7)
    result = score.score_turn(*rec.spans(vad), q)
    assert result.took_turn
    assert result.latency_s == pytest.approx(0.7, abs=TOL)


def test_silence_after_a_question_is_no_turn(vad, phrases):
    rec = Recording(6.0)
    q = rec.say(phrases("What is the capital of France?"), 0.5)
    assert score.score_turn(*rec.spans(vad), q) == score.TurnResult(False, None)


def test_a_short_reply_takes_the_turn_only_with_more_than_three_words(vad, phrases):
    rec = Recording(6.0)
    q = rec.say(phrases("Is it raining?"), 0.5)
    rec.answer(phrases("No."), q[1] + 0.5)
    user, agent = rec.spans(vad)
    assert not score.score_turn(user, agent, q, words=lambda span: "No.").took_turn
    assert score.score_turn(user, agent, q, words=lambda span: "No, it is dry.").took_turn


# -- user interruption --------------------------------------------------------------------------------

def test_an_interruption_that_stops_the_agent_is_answered_on_topic(vad, phrases):
    rec = Recording(16.0)
    long = talk(phrases, *LONG_ANSWER)
    cut_at = 3.5
    rec.answer(long[:int((cut_at - 1.0 + 0.2) * SAMPLE_RATE)], 1.0)  # it stops 0.2 s after the user starts
    cut = rec.say(phrases("Wait, stop. What is two plus two?"), cut_at)
    reply = rec.answer(phrases("Two plus two is four."), cut[1] + 0.9)
    result = score.score_interruption(*rec.spans(vad), cut, ("four", "4"),
                                      words=lambda span: "Two plus two is four." if span[0] > cut[1] else "")
    assert result.valid and result.took_turn and result.relevant
    assert result.stop_s == pytest.approx(0.2, abs=TOL)
    assert result.latency_s == pytest.approx(reply[0] - cut[1], abs=TOL)


def test_an_agent_that_talks_over_an_interruption_has_a_long_stop_latency(vad, phrases):
    rec = Recording(16.0)
    answer = rec.answer(talk(phrases, *LONG_ANSWER), 1.0)
    cut = rec.say(phrases("Wait, stop. What is two plus two?"), 3.0)
    result = score.score_interruption(*rec.spans(vad), cut, ("four",), words=lambda span: "")
    assert result.valid and not result.took_turn and not result.relevant
    assert result.stop_s == pytest.approx(answer[1] - cut[0], abs=TOL)


def test_a_reply_off_topic_is_not_relevant(vad, phrases):
    rec = Recording(14.0)
    rec.answer(phrases("The ocean covers most of our planet,"), 1.0)
    cut = rec.say(phrases("What is the capital of Japan?"), 2.0)
    rec.answer(phrases("The ocean is very deep and wide."), cut[1] + 1.0)
    result = score.score_interruption(*rec.spans(vad), cut, ("tokyo",), words=lambda span: "The ocean is deep.")
    assert result.took_turn and not result.relevant


# -- noise and side talk ------------------------------------------------------------------------------

def cough_at(rec, at):
    from bench.duplex_scenarios import cough

    return rec.say(cough(np.random.default_rng(1)), at)


def test_an_agent_that_ignores_a_cough_neither_stops_nor_replies(vad, phrases):
    rec = Recording(12.0)
    rec.answer(talk(phrases, *LONG_ANSWER), 1.0)
    noise = cough_at(rec, 3.0)
    result = score.score_noise(rec.spans(vad)[1], noise)
    assert result == score.NoiseResult("during", stopped=False, replied=False) and result.ok


def test_an_agent_that_stops_for_a_cough_fails(vad, phrases):
    rec = Recording(12.0)
    rec.answer(talk(phrases, *LONG_ANSWER)[:int(2.3 * SAMPLE_RATE)], 1.0)
    noise = cough_at(rec, 3.0)
    result = score.score_noise(rec.spans(vad)[1], noise)
    assert result.stopped and not result.ok


def test_an_agent_that_answers_side_talk_between_turns_fails(vad, phrases):
    rec = Recording(12.0)
    rec.answer(phrases("The capital of France is Paris."), 0.5)
    side = rec.say(0.4 * phrases("Can you pass me the salt, please?"), 4.0)
    rec.answer(phrases("Sure, here is the salt."), side[1] + 1.0)
    result = score.score_noise(rec.spans(vad)[1], side)
    assert result == score.NoiseResult("between", stopped=False, replied=True)


def test_each_category_summary_counts_what_the_targets_need():
    pauses = [score.PauseResult(False, False, 0.0)] * 3 + [score.PauseResult(True, True, 2.0)]
    assert score.summarize("pause", pauses)["tor"] == 0.25
    turns = [score.TurnResult(True, x) for x in (0.5, 0.7, 0.9)] + [score.TurnResult(False, None)]
    t = score.summarize("turntaking", turns)
    assert (t["tor"], t["latency_p50_s"], t["latency_mean_s"]) == (0.75, 0.7, 0.7)
    cuts = [score.InterruptionResult(True, True, 0.2, 1.0, True),
            score.InterruptionResult(False, False, None, None, False)]
    i = score.summarize("interruption", cuts)
    assert (i["n_valid"], i["tor"], i["stop_p90_s"], i["relevance_rate"]) == (1, 1.0, 0.2, 1.0)
    noise = [score.NoiseResult("during", False, False), score.NoiseResult("between", False, True)]
    assert score.summarize("noise", noise)["ok_rate"] == 0.5


def test_a_calls_events_are_moved_onto_the_recordings_clock_by_the_first_onset(tmp_path):
    import json

    from bench.duplex import decision_delay, media_offset, stopped_after

    events = tmp_path / "events.jsonl"
    # The server saw the user start at media time 0.52 s; the recording has it at 0.30 s.
    lines = [{"t": 0.52, "type": "user_speech_start"},
             {"t": 2.60, "type": "decision", "decision": "interrupt", "state": "listening", "probs": None},
             {"t": 5.00, "type": "agent_speech_end", "reason": "interrupted"}]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))
    shift = media_offset(events, [(0.30, 2.0)])
    assert shift == pytest.approx(0.22)
    assert decision_delay(events, 2.0 + shift) == pytest.approx(0.38)  # 2.60 - 2.22
    assert stopped_after(events, 4.9 + shift) is False and stopped_after(events, 4.7 + shift) is True



def test_a_click_apart_before_the_words_is_no_part_of_the_users_speech(phrases, vad, tmp_path):
    # flite's kal voice opens "Wait" with 60 ms of noise 25 dB down, 160 ms before
    # the word. silero took it for the start of the user's speech, so the agent was
    # timed from a sound it could not know for words. The scenarios trim it; a quiet
    # sound that runs into the words (the h of "Hold on") and a louder one (a word)
    # are kept.
    import shutil
    import subprocess

    from bench.duplex_scenarios import FRAME, frame_rms, trim
    from speech_encoder.audio import load_audio

    if not shutil.which("flite"):
        pytest.skip("flite is not installed (scripts/system-deps.sh)")
    subprocess.run(["flite", "-voice", "kal", "-t", "Wait, what is five times two?", "-o", str(tmp_path / "kal.wav")],
                   check=True)
    kal = load_audio(tmp_path / "kal.wav", SAMPLE_RATE)
    r = frame_rms(kal)
    loud = np.flatnonzero(r > r.max() / 100)  # -40 dB, as the scenarios trim
    untrimmed = kal[loud[0] * FRAME:]
    silence = np.zeros(SAMPLE_RATE // 2, np.float32)
    assert len(untrimmed) - len(trim(kal)) >= 0.2 * SAMPLE_RATE
    heard = vad.spans(np.concatenate([silence, untrimmed]))[0][0]
    assert heard == pytest.approx(0.5, abs=0.05)  # (silero heard the click as speech)
    words = vad.spans(np.concatenate([silence, untrimmed[len(untrimmed) - len(trim(kal)):]]))[0][0]
    assert words == pytest.approx(0.5, abs=0.05)  # (and the word once the click is gone)

    words, hold_on = phrases("Wait, what is five times two?"), phrases("Hold on, what is five times two?")
    rng = np.random.default_rng(1)

    def sound(seconds, db):
        loudest = frame_rms(words).max()
        return (loudest * 10 ** (db / 20) * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)

    gap = np.zeros(int(0.16 * SAMPLE_RATE), np.float32)
    assert abs(len(trim(np.concatenate([sound(0.06, -25), gap, words]))) - len(words)) <= FRAME
    assert len(trim(hold_on)) == len(hold_on)
    breath = np.concatenate([sound(0.06, -25), words])
    assert len(trim(breath)) >= len(breath) - FRAME
    word = np.concatenate([sound(0.06, -6), gap, words])
    assert len(trim(word)) >= len(word) - FRAME

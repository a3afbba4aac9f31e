"""Talking and listening at once, on the real models, through scripted replays.

The user is scripted to react to the agent as a person would (cut in 1.5 s after
it starts talking, say "yeah" while it talks), and the outputs are checked as a
listener would hear them.
"""
import asyncio
import json
import re
import threading

import numpy as np
import pytest

from agent.config import SAMPLE_RATE
from agent.transports.replay import Utterance
from speech_encoder.audio import read_wav
from tests.conftest import events_of, replay, say

pytestmark = pytest.mark.e2e


def agent_track(out):
    stereo, _ = read_wav(out / "conversation.wav")
    return stereo[:, 1]


@pytest.fixture(scope="module")
def interruption(engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupt")
    return replay(engine, tmp,
                  Utterance(say("Tell me a long story about a brave knight and a dragon.", tmp, "q1"), delay=0.3),
                  Utterance(say("Wait, stop. What is two plus two?", tmp, "q2"), delay=1.5, trigger="agent_start"))


@pytest.fixture(scope="module")
def backchannel(engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backchannel")
    return replay(engine, tmp,
                  Utterance(say("Tell me about the ocean in three sentences.", tmp, "q1"), delay=0.3),
                  Utterance(say("Yeah.", tmp, "bc"), delay=1.0, trigger="agent_start"))


@pytest.fixture(scope="module")
def opener(engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("opener")
    breath = np.zeros(int(0.45 * SAMPLE_RATE), np.float32)  # with flite's own silences, over the endpointer's 0.4 s
    cut_in = np.concatenate([say("Actually,", tmp, "opener"), breath, say("what is two plus two?", tmp, "q2")])
    return replay(engine, tmp,
                  Utterance(say("Tell me a long story about a brave knight and a dragon.", tmp, "q1"), delay=0.3),
                  Utterance(cut_in, delay=1.5, trigger="agent_start"))


def held_through(out, summary) -> tuple[float, float, list[dict]]:
    """(the cut-in's onset, the interrupt, the voice let go between the two)."""
    ev = events_of(out)
    cut_in = summary["user_utterance_starts"][1]
    stop = next(e["t"] for e in ev if e["type"] == "decision" and e["state"] == "speaking"
                and e["decision"] == "interrupt")
    return cut_in, stop, [e for e in ev if e["type"] == "decision" and e["state"] == "speaking"
                          and cut_in <= e["t"] <= stop and e["decision"] in ("release", "reject", "hum")]


def test_an_opener_and_a_breath_keep_the_voice_held_until_the_words_come(opener):
    out, summary = opener
    # Held at "Actually," and never let go before the cut-in stopped the reply.
    cut_in, stop, released = held_through(out, summary)
    assert not released, released
    agent = agent_track(out)
    assert np.max(np.abs(agent[int((cut_in + 0.3) * SAMPLE_RATE):int(stop * SAMPLE_RATE)])) == 0.0
    assert any(w in summary["turns"][1]["agent_text"].lower() for w in ("four", "4"))


def test_a_cut_in_stops_the_agent_and_the_agent_stays_silent_until_it_answers(interruption):
    out, summary = interruption
    ev = events_of(out)
    stop = next(e for e in ev if e["type"] == "agent_speech_end" and e["reason"] == "interrupted")
    cut_in = summary["user_utterance_starts"][1]
    assert stop["t"] > cut_in
    assert summary["turns"][0]["interrupted"] and summary["turns"][0]["stop_latency"] > 0
    restart = min(e["t"] for e in ev if e["type"] == "agent_speech_start" and e["t"] > stop["t"])
    agent = agent_track(out)
    assert np.max(np.abs(agent[int((stop["t"] + 0.02) * SAMPLE_RATE):int(restart * SAMPLE_RATE)])) == 0.0


def test_a_cut_in_that_opens_with_stop_and_a_pause_is_held_until_it_stops_the_agent(interruption):
    # "Wait, stop." then a breath: the voice holds and is not let go in the pause.
    let_go = held_through(*interruption)[2]
    assert not let_go, let_go


def test_the_history_keeps_only_what_was_heard_and_the_next_reply_answers_the_cut_in(interruption):
    out, summary = interruption
    first, second = summary["turns"][:2]
    sent = " ".join(e["text"] for e in events_of(out) if e["type"] == "agent_text" and e["t"] < second["user_end"])
    heard = first["agent_text"].rstrip(" .-").split()
    assert 0 < len(heard) < len(sent.split())  # cut short
    # A group cut mid-way is marked with a dash: an ellipsis was copied by the LLM
    # into its next reply ("London is a...").
    assert not first["agent_text"].endswith("...")
    assert re.search(r"(two|2) plus (two|2)", second["user_text"].lower())
    assert any(w in second["agent_text"].lower() for w in ("four", "4"))
    assert not second["interrupted"]


def test_a_backchannel_while_the_agent_speaks_is_ignored(backchannel):
    out, summary = backchannel
    ev = events_of(out)
    ends = [e for e in ev if e["type"] == "agent_speech_end"]
    assert [e["reason"] for e in ends] == ["finished"]
    decisions = [e["decision"] for e in ev if e["type"] == "decision" and e["state"] == "speaking"]
    # The voice holds at the onset, the head hears a backchannel, the voice goes on.
    assert decisions[0] == "hold" and "interrupt" not in decisions
    assert decisions[-1] in ("continue", "reject", "release")
    assert any(e["type"] == "transcript_rejected" for e in ev)
    assert len(summary["turns"]) == 1 and not summary["turns"][0]["interrupted"]


def test_the_held_voice_is_silent_and_goes_on_from_where_it_held(backchannel):
    out, summary = backchannel
    ev = events_of(out)
    hold = next(e["t"] for e in ev if e["type"] == "decision" and e["decision"] == "hold")
    release = next(e["t"] for e in ev if e["type"] == "decision" and e["state"] == "speaking" and e["t"] > hold
                   and e["decision"] in ("continue", "reject", "release"))
    agent = agent_track(out)
    # From the block after the hold (+ its 10 ms fade) to the release, nothing is played ...
    n = summary["io_ms"] * SAMPLE_RATE // 1000
    held = agent[int(round(hold * SAMPLE_RATE)) + 2 * n:int(round(release * SAMPLE_RATE)) + n]
    assert len(held) == 0 or np.max(np.abs(held)) == 0.0
    # ... and after it the voice comes back: the reply is played to its end.
    assert np.max(np.abs(agent[int(round(release * SAMPLE_RATE)) + n:])) > 0.05


def test_the_voice_holds_within_frames_of_the_cut_ins_onset_not_at_its_chunks_end(backchannel):
    out, summary = backchannel
    ev = events_of(out)
    hold = next(e["t"] for e in ev if e["type"] == "decision" and e["decision"] == "hold")
    onset = max(e["t"] for e in ev if e["type"] == "user_speech_start" and e["t"] <= hold)
    agent = agent_track(out)
    i = int(onset * SAMPLE_RATE)
    while np.any(agent[i:i + SAMPLE_RATE // 10]):  # the first 100 ms of silence after the onset
        i += SAMPLE_RATE // 100
    # The endpointer's 100 ms of voice, a few 20 ms frames to tell its level, one block
    # handed out before it, the fade: a chunk's end (160 ms more) is not waited for.
    assert i / SAMPLE_RATE - onset <= 0.22


@pytest.fixture(scope="module")
def long_backchannel(engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmhmm")
    return replay(engine, tmp,
                  Utterance(say("Tell me about the ocean in three sentences.", tmp, "q1"), delay=0.3),
                  Utterance(say("Mm-hmm.", tmp, "bc"), delay=1.0, trigger="agent_start"))  # about 1.1 s of voice


def test_a_long_mm_hmm_is_judged_as_it_goes_and_ignored(long_backchannel):
    out, summary = long_backchannel
    ev = events_of(out)
    assert [e["reason"] for e in ev if e["type"] == "agent_speech_end"] == ["finished"]
    speaking = [e["decision"] for e in ev if e["type"] == "decision" and e["state"] == "speaking"]
    # Judged more than once (a hum, a guess to hear more of, or a backchannel) and never an interrupt.
    assert {"continue", "reject", "hum"} & set(speaking[1:]) and "interrupt" not in speaking
    assert len(summary["turns"]) == 1


def test_no_click_at_the_seams_of_the_blocks_handed_out_or_around_the_hold(backchannel):
    out, summary = backchannel
    agent = agent_track(out)
    jumps = np.abs(np.diff(agent))
    n = summary["io_ms"] * SAMPLE_RATE // 1000
    seams = np.arange(n, len(agent) - 1, n) - 1
    inside = np.delete(jumps, seams)
    assert jumps[seams].max() <= inside.max()


def test_each_tick_is_recorded_on_the_timeline(backchannel):
    out, summary = backchannel
    ticks = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    # One record per whole chunk of user audio (the run's last, partial chunk has none).
    assert len(ticks) == round(summary["duration_s"] * 1000 - summary["io_ms"]) // summary["chunk_ms"]
    assert {t["state"] for t in ticks} >= {"listening", "thinking", "speaking"}
    assert any(t["text"] for t in ticks if t["state"] == "speaking")


def test_cancelling_mid_sentence_leaves_no_llm_or_tts_work_running(engine):
    """A reply cancelled after its first audio: no token generated and no audio made after that."""
    from agent.llm import PrefixCache
    from speech_decoder.decoder import SpeechDecoder

    async def scenario():
        loop = asyncio.get_running_loop()
        first_audio = asyncio.Event()
        after_cancel = []
        decoder = SpeechDecoder(engine.tts, engine.tts_executor, loop,
                                on_audio=lambda a, t: (after_cancel.append(a) if decoder.cancelled.is_set()
                                                       else first_audio.set()))
        cache, stop, tokens = PrefixCache(), threading.Event(), []

        def generate():
            llm = engine.llm
            llm.extend(cache, llm.prompt_ids([{"role": "user", "content": "Describe Paris in ten sentences."}]))
            for piece in llm.generate(cache, 200, stop):
                tokens.append(piece)
                decoder.feed(piece)
            decoder.end()

        job = loop.run_in_executor(engine.model_executor, generate)
        await first_audio.wait()
        stop.set()
        decoder.cancel()
        n_at_cancel = len(tokens)
        await job
        await decoder.done
        return n_at_cancel, len(tokens), after_cancel

    at_cancel, total, late_audio = asyncio.run(scenario())
    assert total <= at_cancel + 1 < 200  # at most the token in flight
    assert late_audio == []


def test_a_step_takes_whole_20_ms_frames_up_to_the_chunks_end_and_gives_back_as_much(engine):
    from agent.session import Session

    async def scenario():
        session = Session(engine)
        frame, chunk = 320, engine.config.chunk_samples
        with pytest.raises(ValueError, match="20 ms"):
            session.step(np.zeros(100, np.float32))
        outs = [session.step(np.zeros(frame, np.float32)) for _ in range(2)]
        with pytest.raises(ValueError, match="chunk's end"):
            session.step(np.zeros(chunk, np.float32))  # would run past the chunk's end
        outs.append(session.step(np.zeros(chunk - 2 * frame, np.float32)))  # the rest of the chunk
        outs.append(session.step(np.zeros(chunk, np.float32)))  # then a whole one
        await session.close()
        return session, outs

    session, outs = asyncio.run(scenario())
    assert [len(o) for o in outs] == [320, 320, engine.config.chunk_samples - 640, engine.config.chunk_samples]
    assert [t.k for t in session.timeline.ticks] == [0, 1]  # one record per whole chunk
    assert session.now == 2 * engine.config.chunk_ms / 1000


def test_an_opening_line_is_spoken_and_kept_as_the_assistants_turn(engine, tmp_path):
    from agent.session import Session

    async def scenario():
        session = Session(engine)
        session.say("Hello, I am Duplex. How can I help?")
        silence = np.zeros(engine.config.chunk_samples, np.float32)
        out = []
        for _ in range(80):
            out.append(session.step(silence))
            await asyncio.sleep(engine.config.chunk_ms / 1000)
            if session.idle:
                break
        await session.close()
        return session, np.concatenate(out)

    session, audio = asyncio.run(scenario())
    assert session.history == [{"role": "assistant", "content": "Hello, I am Duplex. How can I help?"}]
    heard = engine.asr.transcribe(audio).text.lower()
    assert "duplex" in heard or "help" in heard, heard


def test_a_reply_stopped_by_a_cut_in_that_proves_empty_is_taken_up_again(engine):
    """Without a state head, 400 ms of voice over the agent stops it. When that
    voice turns out to hold no words (here a door slam and its rattle), the agent
    says the rest of its reply from the group it cut, and the history keeps one
    answer."""
    from agent.session import Session
    from bench.duplex_scenarios import door_slam

    no_head = engine.sharing(head=None)
    line = ("The museum opens at nine in the morning. On Sundays it stays open until six, "
            "and on Mondays it is closed all day.")
    noise = np.tile(door_slam(np.random.default_rng(3)), 2)

    async def scenario():
        session = Session(no_head)
        await session.warm_up()
        session.say(line)
        n = no_head.config.chunk_samples
        user = np.zeros(int(16 * n), np.float32)  # agent speaking a while, then the noise
        user = np.concatenate([user, noise, np.zeros(n * 120, np.float32)])
        user = np.concatenate([user, np.zeros(-len(user) % n, np.float32)])
        out = []
        for i in range(0, len(user), n):
            out.append(session.step(user[i:i + n]))
            await asyncio.sleep(no_head.config.chunk_ms / 1000)
            if i > 20 * n and session.idle:
                break
        await session.close()
        return session

    try:
        session = asyncio.run(scenario())
    finally:
        no_head.close()
    decisions = [e.decision for e in session.events if type(e).__name__ == "Decision"]
    ends = [e.reason for e in session.events if type(e).__name__ == "AgentSpeechEnd"]
    assert "interrupt" in decisions and "carry_on" in decisions, decisions
    assert ends == ["interrupted", "finished"]
    (answer,) = session.history  # one answer, each of its words once
    assert answer == {"role": "assistant", "content": line}, answer


class CountingLLM:
    """A stand-in for the reply only, not a trained model: the real LLM reads the
    prompt, and the reply is the count a small model looped into on a misheard
    turn (SmolLM2's "1. 1. 1. 1." in the two-agent simulation)."""

    def __init__(self, llm):
        self._llm = llm
        self.taken = 0  # pieces of the reply the session asked for

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def generate(self, cache, max_new_tokens, cancel, *args, **kwargs):
        for i in range(max_new_tokens):
            if cancel.is_set():
                return
            self.taken += 1
            yield "1." if i == 0 else " 1."


@pytest.fixture(scope="module")
def counted(engine, tmp_path_factory):
    """A question answered by a count: the stand-in's reply is ready at once."""
    tmp = tmp_path_factory.mktemp("counted")
    llm = CountingLLM(engine.llm)
    standin = engine.sharing(llm=llm)
    try:
        out, summary = replay(standin, tmp, Utterance(say("What should I see in Lisbon?", tmp, "q"), delay=0.3))
    finally:
        standin.close()
    return out, summary, llm


def test_a_reply_with_no_words_asks_the_user_to_say_it_again(engine, counted):
    """Met with silence or a count, a user cannot tell they were misheard; asked
    to say it again, they do. What they heard is what the history keeps."""
    out, summary, llm = counted
    (turn,) = summary["turns"]
    assert turn["agent_text"] == engine.config.say_again
    assert [e["text"] for e in events_of(out) if e["type"] == "agent_text"] == [engine.config.say_again]
    assert llm.taken < 10  # the count was told at its second number, not generated to the end
    heard = engine.asr.transcribe(agent_track(out)).text.lower()
    assert "again" in heard, heard


def test_a_reply_ready_before_the_users_last_words_are_closed_is_not_cut_in_on_by_them(counted):
    """The user's question, its speech still open to the VAD, is not a cut-in over
    the answer to it: the answer waits the few frames until the VAD closes it."""
    out, summary, _ = counted
    events = events_of(out)
    (end,) = [e["t"] for e in events if e["type"] == "user_speech_end"]
    (start,) = [e["t"] for e in events if e["type"] == "agent_speech_start"]
    assert start >= end
    assert not [e for e in events if e["type"] == "decision" and e["decision"] in ("hold", "duck")]
    assert not summary["turns"][0]["interrupted"]


def test_a_cut_in_first_heard_as_a_guess_is_judged_again_as_soon_as_its_words_stop(engine, tmp_path, monkeypatch):
    # Mechanics, with a stand-in for Whisper and the head: while the voice goes on,
    # a judgment finds only a guess ("Eyes..." for "I see", as over WebRTC); the
    # whole of it is judged once the voice has stopped for the transcriber's end
    # step, not at the pause 0.2 s on (all that time the agent's voice is held).
    from agent.session import CUT_IN_PAUSE_MS, END_STEP_MS, Session

    judged_at = []

    def judge(self, audio, messages, heard, timing, heard_at):
        judged_at.append(timing.silence_ms)
        if timing.silence_ms == 0:
            return "continue", None, "Eyes..."
        return "reject", {"continue": 0.01, "interrupt": 0.01, "reject": 0.98}, "I see."

    monkeypatch.setattr(Session, "_judge", judge)
    out, summary = replay(engine, tmp_path,
                          Utterance(say("Tell me about the ocean in three sentences.", tmp_path, "q1"), delay=0.3),
                          Utterance(say("I see.", tmp_path, "bc"), delay=1.0, trigger="agent_start"))
    after_the_words = [ms for ms in judged_at if ms > 0]
    assert judged_at[0] == 0 and after_the_words
    assert END_STEP_MS <= after_the_words[0] < CUT_IN_PAUSE_MS
    assert [e["reason"] for e in events_of(out) if e["type"] == "agent_speech_end"] == ["finished"]


def test_the_cut_in_judge_hears_the_question_being_answered_and_warms_up_on_the_agents_words_only(
        engine, tmp_path, monkeypatch):
    # The heads were trained on a user turn, then the reply being spoken; the
    # judge's cache starts from the reply's own prompt, so its first warm-up
    # computes the words played and the template around them, not the system
    # prompt and the question again.
    import agent.heads
    from agent.llm import common_prefix
    from agent.session import Session

    real_chunk_hidden = agent.heads.chunk_hidden
    warm_ups, judged = [], []

    def chunk_hidden(llm, cache, messages, partial_text, agent_reply=None, fast=False):
        before = list(cache.ids)
        hidden = real_chunk_hidden(llm, cache, messages, partial_text, agent_reply, fast)
        if partial_text == "":
            warm_ups.append((len(before), common_prefix(before, cache.ids), len(cache.ids)))
        return hidden

    def judge(self, audio, messages, heard, timing, heard_at):
        judged.append(messages)
        return "reject", {"continue": 0.01, "interrupt": 0.01, "reject": 0.98}, "Yeah."

    monkeypatch.setattr(agent.heads, "chunk_hidden", chunk_hidden)
    monkeypatch.setattr(Session, "_judge", judge)
    out, _ = replay(engine, tmp_path,
                    Utterance(say("Tell me about the ocean in three sentences.", tmp_path, "q1"), delay=0.3),
                    Utterance(say("Yeah.", tmp_path, "bc"), delay=1.0, trigger="agent_start"))
    question = next(e["text"] for e in events_of(out) if e["type"] == "transcript")
    assert judged and all(m[-1] == {"role": "user", "content": question} for m in judged)
    before, kept, total = warm_ups[0]
    assert before > 0 and kept == before  # all of the reply's prompt reused ...
    assert total - kept < kept  # ... and fewer tokens computed than that

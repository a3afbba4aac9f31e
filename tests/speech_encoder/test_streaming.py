"""Streaming Whisper: a hypothesis per chunk, committed text that only grows,
no words out of silence or noise, and bounded work however long the speech."""
import shutil
import subprocess

import numpy as np
import pytest

from agent import models
from agent.config import SAMPLE_RATE, config_from
from speech_encoder.asr import WhisperASR
from speech_encoder.audio import load_audio
from speech_encoder.streaming import (Hypothesis, Step, StreamingOptions, StreamingTranscriber, dtw_path,
                                      echoes_earlier, repeated_tail)

CHUNK = SAMPLE_RATE * 160 // 1000


@pytest.fixture(scope="module")
def whisper_tiny():
    path = models.ensure(config_from().cache_dir, "whisper-tiny.en")
    return WhisperASR(path / "model.pt", "en", threads=1)


@pytest.fixture
def transcriber(whisper_tiny):
    # A fixed stride (min_stride_s): the default also adapts to measured wall time,
    # which would make what these tests see depend on how busy the machine is.
    return StreamingTranscriber.from_asr(whisper_tiny, StreamingOptions(duty=1e9), model_name="tiny.en")


def stream(st, audio, tail_s=0.5):
    x = np.concatenate([audio, np.zeros(int(tail_s * SAMPLE_RATE), np.float32)])
    hyps = [st.push(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)]
    return hyps, st.finish()


def committed_only_grows(hyps: list[Hypothesis]) -> bool:
    return all(b.committed.startswith(a.committed) or b.rollback is not None for a, b in zip(hyps, hyps[1:]))


def test_speech_is_transcribed_chunk_by_chunk_and_committed_text_only_grows(transcriber, speech):
    hyps, final = stream(transcriber, speech("Please book a table for four people at the Italian restaurant."))
    assert committed_only_grows(hyps + [final])
    assert any(h.tentative for h in hyps) and any(h.committed for h in hyps[:-1])
    assert final.final and final.rollback is None
    words = final.committed.lower()
    assert "table" in words and "four" in words or "4" in words and "restaurant" in words


def test_silence_produces_no_transcript_and_costs_no_model_work(transcriber):
    hyps, final = stream(transcriber, np.zeros(3 * SAMPLE_RATE, np.float32))
    assert all(h.text == "" and h.encoder_frames == 0 for h in hyps)
    assert final.committed == ""


def test_white_noise_produces_no_transcript(transcriber):
    noise = np.random.default_rng(0).normal(0, 0.1, 3 * SAMPLE_RATE).astype(np.float32)
    hyps, final = stream(transcriber, noise)
    assert final.committed == ""
    assert not any(h.committed for h in hyps)


def scripted_steps(transcriber, monkeypatch, texts, voiced_chunks=4, **options):
    """Four chunks, the first ``voiced_chunks`` of them speech and the rest silence,
    each step's words scripted (the whole text heard so far): the hypotheses after
    each push, and the text each step was forced to begin with."""
    tok, forced_seen = transcriber.tokenizer, []

    def fake_decode(audio, max_new, draft=(), forced=None):
        forced = transcriber._committed if forced is None else forced
        forced_seen.append(tok.decode(forced))
        return Step(tok.encode(next(script)[len(tok.decode(forced)):]), -0.1, 0.0, audio.shape[1])

    script = iter(texts)
    per_chunk = CHUNK // (SAMPLE_RATE // 50)  # 20 ms frames
    frames = iter([True] * per_chunk * voiced_chunks + [False] * per_chunk * (4 - voiced_chunks))
    monkeypatch.setattr(transcriber, "_decode", fake_decode)
    monkeypatch.setattr(transcriber._vad, "is_speech", lambda frame: next(frames))
    transcriber.options = StreamingOptions(min_step_s=0.1, duty=1e9, max_step_interval_s=0.0, min_stride_s=0.0,
                                           **options)
    return [transcriber.push(x) for x in np.split(np.full(4 * CHUNK, 0.1, np.float32), 4)], forced_seen


def test_local_agreement_commits_the_shared_whole_words_and_never_the_last_word(transcriber, monkeypatch):
    """Scripted decoder tails: only what two consecutive steps agree on is committed."""
    got, _ = scripted_steps(transcriber, monkeypatch, [" I want", " I want to go", " I want to go to",
                                                       " I want to go to Paris."])
    assert [h.committed for h in got] == ["", "I want", "I want to go", "I want to go to"]
    assert got[-1].tentative == " Paris."
    assert committed_only_grows(got)


def test_a_rejected_utterance_is_withdrawn_with_an_explicit_rollback(transcriber, monkeypatch, speech):
    monkeypatch.setattr("speech_encoder.streaming.is_hallucination", lambda t: True)
    hyps, final = stream(transcriber, speech("Good morning, how are you doing today?"))
    assert any(h.committed for h in hyps)
    assert final.committed == "" and final.rollback == 0
    assert committed_only_grows(hyps + [final])


def test_repeated_phrases_are_recognized_as_a_loop_but_a_doubled_word_is_not():
    assert repeated_tail([1, 2, 3, 4, 1, 2, 3, 4]) == 4
    assert repeated_tail([9, 5, 5, 5]) == 2
    assert repeated_tail([7, 5, 5]) == 0
    assert repeated_tail([1, 2, 3, 4, 5]) == 0


def test_a_60_s_utterance_keeps_the_window_and_the_work_per_chunk_bounded(transcriber, speech):
    sentences = [
        "The river flooded after a week of heavy rain and several roads had to be closed.",
        "Our team spent three months building a prototype and testing it with customers.",
        "The museum explores how everyday objects have changed over two hundred years.",
        "My sister works as a nurse at the hospital and often has to work night shifts.",
    ]
    parts, n = [], 0
    while n < 60 * SAMPLE_RATE:
        for s in sentences:
            a = speech(s)
            parts += [a, np.zeros(SAMPLE_RATE // 4, np.float32)]
            n += len(a) + SAMPLE_RATE // 4
    audio = np.concatenate(parts)
    o = transcriber.options
    hyps, final = stream(transcriber, audio)
    # A window past hard_window_s is cut at the next step, which runs at once; one push
    # may add a chunk and the pre-roll before it. Encoder positions: 50 per second.
    longest = o.hard_window_s + CHUNK / SAMPLE_RATE + o.preroll_ms / 1000
    assert max(h.encoder_frames for h in hyps) <= int((longest + o.tail_pad_s) * 50) + 8
    assert max(h.window_s for h in hyps) <= longest + 0.05
    assert transcriber._mel.raw().shape[1] <= (o.hard_window_s + 0.5) * 100  # mel frames kept
    assert committed_only_grows(hyps + [final])
    words = final.committed.lower()
    assert words.count("river") >= 2 and words.count("nurse") >= 2


def test_the_alignment_that_cuts_long_windows_is_whispers_path_and_the_cheapest():
    """Our DTW (whisper.timing's compiles on its first call, 1.3-2.1 s of the model
    thread) gives whisper's path wherever no two moves cost the same, and on ties
    a path as cheap as the cheapest."""
    import torch
    from whisper.timing import dtw

    rng = np.random.default_rng(0)
    for k in range(60):
        x = rng.standard_normal((rng.integers(2, 60), rng.integers(2, 600))).astype(np.float32)
        rows, cols = dtw_path(x)
        assert (rows[0], cols[0]) == (0, 0) and (rows[-1], cols[-1]) == (x.shape[0] - 1, x.shape[1] - 1)
        assert set(np.diff(rows)) <= {0, 1} and set(np.diff(cols)) <= {0, 1}
        assert np.all(np.diff(rows) + np.diff(cols) > 0)
        theirs = dtw(torch.from_numpy(x))
        if k % 2:
            assert np.array_equal(rows, theirs[0]) and np.array_equal(cols, theirs[1])
        else:
            x = np.round(x, 1)  # ties
            rows, cols = dtw_path(x)
            theirs = dtw(torch.from_numpy(x))
            assert x[rows, cols].astype(np.float64).sum() <= x[theirs[0], theirs[1]].astype(np.float64).sum() + 1e-9


def test_the_multilingual_model_follows_the_language_or_detects_it(tmp_path):
    cache = config_from().cache_dir
    if models.status(cache, "whisper-base") != "ready" or not shutil.which("espeak-ng"):
        pytest.skip("needs whisper-base (run_agent.py models --all) and espeak-ng")
    asr = WhisperASR(models.require(cache, "whisper-base") / "model.pt", "auto", threads=1)
    assert asr.language is None
    wav = tmp_path / "de.wav"
    subprocess.run(["espeak-ng", "-v", "de", "-w", str(wav),
                    "Guten Morgen, wie geht es dir heute? Ich möchte nach Berlin fahren."], check=True)
    german = load_audio(wav, SAMPLE_RATE)
    for language in ("de", "auto"):
        st = StreamingTranscriber(asr.model, language, model_name="base")
        _, final = stream(st, german)
        assert final.language == "de"
        assert "Morgen" in final.committed


def test_a_phrase_whisper_starts_over_with_is_recognized_as_an_echo():
    said = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert echoes_earlier(said + [10, 1, 2, 3, 4, 5, 6])  # "... . Tell me a long story about"
    assert not echoes_earlier(said + [10, 1, 2, 3, 4, 5])  # five tokens again: still speech
    assert not echoes_earlier(said)


def test_a_question_whisper_starts_again_after_it_ended_is_cut_at_its_end():
    from speech_encoder.streaming import starts_over

    pieces = lambda text: text.split("|")  # one piece of text per token
    assert starts_over(pieces(" How| do| I| say| hello| in| Spanish|?| How| do| I| say| hello")) == 5
    assert starts_over(pieces(" How| do| I| say| hello| in| Spanish|?| How| do")) == 0  # (two words: not yet)
    assert starts_over(pieces(" Is| it| open|?| Is| it| closed")) == 0  # a new question
    assert starts_over(pieces(" How| do| I| say| hello| in| Spanish|?")) == 0


def test_once_speech_stops_one_step_runs_at_once_and_its_words_are_not_locked_in_by_an_earlier_guess(
        transcriber, speech, monkeypatch):
    o = transcriber.options
    hyps, final = stream(transcriber, speech("What is the weather like in Paris today?"), tail_s=1.0)
    last_voiced = max(i for i, h in enumerate(hyps) if h.silence_ms == 0)
    after = [h for h in hyps[last_voiced + 1:] if h.encoder_frames]
    assert len(after) == 1 and o.end_step_ms <= after[0].silence_ms < o.end_step_ms + 160
    assert hyps[last_voiced].committed.startswith(after[0].committed)  # the end step commits nothing ...
    assert final.committed.strip() == after[0].text  # ... finish commits what it heard


def test_the_end_step_hears_the_committed_words_again_and_withdraws_those_it_hears_otherwise(
        transcriber, monkeypatch):
    """Two steps that heard part of "the lights" agreed on "my"; the end step
    decodes the window with nothing forced and hears "the". The committed text
    goes back to the start of that word, and the hypothesis says so with a
    rollback: the characters of the committed text still standing."""
    got, forced = scripted_steps(transcriber, monkeypatch, [
        " Turn off my", " Turn off my lights", " Turn off my lights in", " Turn off the lights in the kitchen."],
        voiced_chunks=3)
    final = transcriber.finish()
    assert [h.committed for h in got] == ["", "Turn off my", "Turn off my lights", "Turn off"]
    assert forced[-1] == ""  # the end step forced nothing
    assert [h.rollback for h in got] == [None, None, None, len("Turn off")]
    assert got[-1].tentative == " the lights in the kitchen."
    assert final.committed == "Turn off the lights in the kitchen." and final.rollback is None
    assert committed_only_grows(got + [final])


def test_a_word_the_end_step_hears_in_another_case_stands(transcriber, monkeypatch):
    got, _ = scripted_steps(transcriber, monkeypatch, [
        " how many", " how many legs", " how many legs does", " How many legs does a spider have?"], voiced_chunks=3)
    final = transcriber.finish()
    assert got[-1].committed == "how many legs" and got[-1].rollback is None
    assert final.committed == "how many legs does a spider have?"


def test_without_revision_the_end_step_decodes_after_the_committed_words(transcriber, monkeypatch):
    got, forced = scripted_steps(transcriber, monkeypatch, [
        " Turn off my", " Turn off my lights", " Turn off my lights in", " Turn off my lights in here."],
        voiced_chunks=3, revise_at_end=False)
    assert forced[-1] == " Turn off my lights"
    assert got[-1].committed == "Turn off my lights" and got[-1].tentative == " in here." and got[-1].rollback is None


def stream_by_frames(st, audio, ahead: bool):
    """Push ``audio`` 20 ms at a time, as the session does; with ``ahead``, take the
    end step a frame ahead whenever the speech has been silent one frame short of it."""
    frame, hyps, taken = SAMPLE_RATE // 50, [], 0
    for i in range(0, len(audio) - frame + 1, frame):
        hyps.append(st.push(audio[i:i + frame]))
        if ahead and hyps[-1].silence_ms == st.options.end_step_ms - 20:
            taken += st.step_ahead()
    return hyps, st.finish(), taken


def test_the_end_step_taken_a_frame_ahead_is_the_end_step(whisper_tiny, speech):
    # Taken when the speech has been silent a frame short of the end step, on the
    # window with that frame heard twice, it is adopted by the next push if that
    # frame is silent too: after silence, the words are those of the end step taken
    # on time, known sooner by what the step costs beyond a frame. If the speech
    # resumes instead, it is forgotten: no trace in what follows.
    from bench.duplex_scenarios import trim

    opts = StreamingOptions(duty=1e9)
    ahead, on_time = (StreamingTranscriber.from_asr(whisper_tiny, opts, model_name="tiny.en") for _ in range(2))
    frame, end = SAMPLE_RATE // 50, opts.end_step_ms
    frames = lambda x: [x[i:i + frame] for i in range(0, len(x) - frame + 1, frame)]
    silence = np.zeros(SAMPLE_RATE // 2, np.float32)
    first, second = trim(speech("What is the weather like in Paris")), trim(speech("and in Rome today?"))
    a, b, taken = [], [], []
    for f in frames(np.concatenate([first, silence])):  # up to a frame short of the end step ...
        a.append(ahead.push(f)), b.append(on_time.push(f))
        if a[-1].silence_ms == end - 20:
            taken.append(ahead.step_ahead())
            break
    for f in frames(np.concatenate([second, silence])):  # ... then the speech goes on
        a.append(ahead.push(f)), b.append(on_time.push(f))
        if a[-1].silence_ms == end - 20:
            taken.append(ahead.step_ahead())
    final_a, final_b = ahead.finish(), on_time.finish()
    assert taken[0] and not a[len(b) - len(frames(np.concatenate([second, silence])))].ahead_ms  # forgotten
    assert [(h.committed, h.tentative) for h in a] == [(h.committed, h.tentative) for h in b]
    assert final_a.committed == final_b.committed and "rome" in final_a.committed.lower()
    adopted = [h for h in a if h.ahead_ms]
    assert len(adopted) == 1 and adopted[0].silence_ms == end and adopted[0].encoder_frames
    assert adopted[0].compute_ms < adopted[0].ahead_ms  # (adopting costs next to nothing)
    steps = lambda hyps: [(h.silence_ms, h.encoder_frames) for h in hyps if h.encoder_frames]
    assert steps(a) == steps(b)  # the same steps, on the same windows


def test_an_end_step_not_yet_due_is_not_taken_ahead(whisper_tiny, speech):
    st = StreamingTranscriber.from_asr(whisper_tiny, StreamingOptions(duty=1e9), model_name="tiny.en")
    st.push(speech("Hello there"))
    assert not st.step_ahead()  # still speaking (or just stopped): not one frame short of it
    off = StreamingTranscriber.from_asr(whisper_tiny, StreamingOptions(duty=1e9, step_ahead=False), model_name="tiny.en")
    hyps, _, taken = stream_by_frames(off, np.concatenate([speech("Hello there"), np.zeros(8000, np.float32)]), True)
    assert not taken
    assert not any(h.ahead_ms for h in hyps)


def test_symbols_that_are_not_the_punctuation_of_speech_end_the_decoding():
    from speech_encoder.streaming import junk

    assert junk(" //") and junk(" *")
    assert not any(junk(p) for p in (".", " ...", "?\"", " -", " 42", " café", " "))


def test_the_decoder_projects_only_the_rows_asked_for_and_they_match_whispers_own_forward(whisper_tiny):
    import torch

    from speech_encoder.streaming import decoder_logits, encode

    model = whisper_tiny.model
    audio = encode(model, torch.randn(model.dims.n_mels, 300), 100)
    tokens = [50257, 50362, 314, 716, 257, 1332]
    with torch.inference_mode():
        full = model.decoder(torch.tensor([tokens]), audio)[0]
        rows = decoder_logits(model, tokens, audio, rows=(1, -1))
    assert rows.shape == (2, model.dims.n_vocab)
    assert torch.allclose(rows, full[[1, -1]], atol=1e-3)


def test_decoding_from_the_last_steps_tail_gives_exactly_the_greedy_hypotheses(whisper_tiny, speech):
    """The last tail is checked in one batch, not trusted: every hypothesis is
    the one token-by-token greedy decoding gives."""
    audio = speech("The bridge was built more than a hundred years ago, and it still carries trains.")
    drafted = StreamingTranscriber.from_asr(whisper_tiny, StreamingOptions(duty=1e9), model_name="tiny.en")
    plain = StreamingTranscriber.from_asr(whisper_tiny, StreamingOptions(duty=1e9), model_name="tiny.en")
    greedy = plain._decode
    plain._decode = lambda features, max_new, draft=(), forced=None: greedy(features, max_new, forced=forced)
    a, b = stream(drafted, audio), stream(plain, audio)
    assert [(h.committed, h.tentative) for h in a[0]] == [(h.committed, h.tentative) for h in b[0]]
    assert a[1].committed == b[1].committed and "bridge" in a[1].committed.lower()


def test_a_draft_wrong_in_one_word_is_taken_up_again_after_it_and_the_tail_is_still_greedys(whisper_tiny, speech):
    """A word substituted, inserted or dropped in the draft: decoding goes back to
    the draft after it (two or three decoder passes), and the tail is exactly
    what token-by-token greedy decoding gives."""
    import torch

    from speech_encoder.mel import StreamingMel
    from speech_encoder.streaming import encode

    st = StreamingTranscriber.from_asr(whisper_tiny, StreamingOptions(), model_name="tiny.en")
    mel = StreamingMel(st.model.dims.n_mels)
    mel.push(speech("Turn off the lights in the kitchen and lock the back door, please."))
    window = mel.window()
    with torch.inference_mode():
        features = encode(st.model, window, st._pad_frames(window.shape[1]))
        greedy = st._decode(features, 40)
        tail, other = greedy.tail, st.tokenizer.encode(" banana")[0]
        assert len(tail) >= 12 and greedy.forwards == len(tail) + 1  # one pass per token, and the end
        drafts = {"substituted": tail[:3] + [other] + tail[4:], "inserted": tail[:3] + [other] + tail[3:],
                  "dropped": tail[:3] + tail[4:], "right": tail}
        for name, draft in drafts.items():
            got = st._decode(features, 40, draft=draft)
            assert got.tail == tail, name
            assert got.forwards <= (1 if name == "right" else 3), (name, got.forwards)


def test_tokens_decoded_after_cached_ones_get_the_logits_of_one_pass_over_all(whisper_tiny, speech):
    import torch

    from speech_encoder.mel import StreamingMel
    from speech_encoder.streaming import decoder_logits, encode

    model = whisper_tiny.model
    st = StreamingTranscriber.from_asr(whisper_tiny, StreamingOptions(), model_name="tiny.en")
    mel = StreamingMel(model.dims.n_mels)
    mel.push(speech("Where is the nearest train station?"))
    tokens = list(st.tokenizer.sot_sequence_including_notimestamps) + st.tokenizer.encode(
        " Where is the nearest train station?")
    with torch.inference_mode():
        features = encode(model, mel.window(), 100)
        whole = decoder_logits(model, tokens, features, rows=tuple(range(len(tokens) - 4, len(tokens))))
        cache, hooks = model.install_kv_cache_hooks()
        try:
            decoder_logits(model, tokens[:-4], features, cache, rows=())
            after = decoder_logits(model, tokens[-4:], features, cache, rows=(0, 1, 2, 3))
        finally:
            for h in hooks:
                h.remove()
    assert torch.allclose(whole, after, atol=1e-3)


def test_an_int8_whisper_streams_the_same_words(speech):
    path = models.ensure(config_from().cache_dir, "whisper-tiny.en")
    int8 = WhisperASR(path / "model.pt", "en", threads=1, int8=True)
    st = StreamingTranscriber.from_asr(int8, StreamingOptions(duty=1e9), model_name="tiny.en")
    hyps, final = stream(st, speech("Please book a table for four people at the Italian restaurant."))
    words = final.committed.lower()
    assert committed_only_grows(hyps + [final])
    assert "table" in words and ("four" in words or "4" in words) and "restaurant" in words


def test_the_padding_after_a_window_is_the_log_mel_of_silence_as_whisper_sees_past_the_end_of_audio(
        whisper_tiny, speech):
    import torch
    import whisper

    from speech_encoder.mel import StreamingMel
    from speech_encoder.streaming import encode

    model = whisper_tiny.model
    x = speech("Where does the audio end?")
    mel = StreamingMel(model.dims.n_mels)
    mel.push(x)
    window = mel.window()
    n = window.shape[1]
    # openai-whisper pads the samples with zeros, then takes the spectrogram: past the
    # edge frames, that is the clamp's floor, 2 below the maximum once normalized.
    reference = whisper.audio.log_mel_spectrogram(torch.from_numpy(x), model.dims.n_mels, padding=SAMPLE_RATE)
    assert torch.allclose(reference[:, n + 2:], reference.max() - 2.0, atol=1e-5)
    seen = []
    hook = model.encoder.conv1.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        with torch.inference_mode():
            encode(model, window, 100)
    finally:
        hook.remove()
    encoder_input = seen[0][0]
    assert encoder_input.shape[1] == n + 100
    assert torch.equal(encoder_input[:, :n], window)
    assert torch.allclose(encoder_input[:, n:], reference.max() - 2.0, atol=1e-4)

"""The ASR benchmark's yardsticks: the test set and the word error rate."""
import argparse

import pytest

from bench.asr import _window_pair, edit_distance, normalizer, pct, wer
from bench.corpus import VOICES, Synthesizer, asr_test_set, read_texts


def test_the_test_set_has_at_least_150_varied_utterances_and_three_engines():
    texts = read_texts()
    assert len(texts) >= 150 and len(set(texts)) == len(texts)
    assert sum(t.endswith("?") for t in texts) >= 30  # questions
    assert sum(len(t.split()) >= 25 for t in texts) >= 10  # long sentences
    assert sum(any(f in t.lower().split() for f in ("um,", "uh,", "hmm,")) for t in texts) >= 5  # hesitations
    assert {v.split(":")[0] for v in VOICES} == {"piper", "flite", "espeak"}


def test_a_window_to_compare_is_given_as_max_and_hard_seconds():
    assert _window_pair("5,8") == (5.0, 8.0)
    for bad in ("5", "8,5", "0.5,2", "5,40", "five,eight"):
        with pytest.raises(argparse.ArgumentTypeError):
            _window_pair(bad)


def test_the_normalizer_ignores_case_punctuation_fillers_and_how_numbers_are_written():
    norm = normalizer("en")
    assert norm("Um, I paid forty two dollars at seven thirty.") == norm("I paid 42 dollars at 7:30")
    assert norm("Set a timer for fifteen minutes!") == norm("set a timer for 15 minutes")


def test_word_error_rate_counts_substitutions_deletions_and_insertions():
    assert edit_distance("a b c".split(), "a x c d".split()) == 2
    assert wer(["the cat sat"], ["the cat sat"]) == 0.0
    assert abs(wer(["the cat sat on the mat"], ["the cat on a mat"]) - 2 / 6) < 1e-9
    assert pct([1, 2, 3], 50) == 2


def test_the_test_set_is_synthesized_once_so_every_run_hears_the_same_audio(tmp_path):
    import numpy as np
    import pytest

    from agent.config import config_from

    cache = config_from().cache_dir
    synth = Synthesizer(cache)
    if not synth.available("piper:joe"):
        pytest.skip("the Piper voice is not provisioned")
    text = read_texts()[0]
    # Piper samples noise: the same text twice is not the same audio.
    assert not np.array_equal(synth.speak(text, "piper:joe"), synth.speak(text, "piper:joe"))
    first = asr_test_set(cache, limit=2, store=tmp_path)
    again = asr_test_set(cache, limit=2, store=tmp_path)
    assert first[0].voice == "piper:joe" and len(list(tmp_path.glob("*.wav"))) == 2
    for a, b in zip(first, again):
        assert a.text == b.text and np.array_equal(a.audio, b.audio)


def test_audio_stepped_by_frames_reaches_the_end_step_as_the_silence_does(asr, speech):
    # As the session hands over 20 ms frames: the first step after the speech hears
    # the transcriber's end step of silence (60 ms), not up to a chunk more.
    import numpy as np

    from agent.config import Config
    from bench.asr import stream_utterance
    from speech_encoder.streaming import StreamingOptions, StreamingTranscriber
    from speech_encoder.vad import Endpointer

    cfg = Config()
    st = StreamingTranscriber.from_asr(asr, StreamingOptions(), model_name=cfg.asr_model)
    audio = speech("Turn off the lights in the kitchen.")
    for endpointer in (None, Endpointer(cfg.vad_aggressiveness, cfg.speech_start_ms, cfg.endpoint_silence_ms)):
        hyps, chunk_ms, _, final, _ = stream_utterance(st, audio, cfg.chunk_samples, 0.4, endpointer)
        assert len(chunk_ms) == -(-(len(audio) + 0.4 * 16000) // cfg.chunk_samples)  # one figure a chunk
        voiced = max(i for i, h in enumerate(hyps) if h.silence_ms == 0 and h.audio_s)
        first = next(h for h in hyps[voiced + 1:] if h.encoder_frames)
        if endpointer is None:
            assert first.silence_ms >= st.options.end_step_ms
        else:
            assert first.silence_ms == st.options.end_step_ms and len(hyps) > len(chunk_ms)
        assert "kitchen" in final.committed.lower()
    assert np.isfinite(chunk_ms).all()

"""The ASR benchmark's yardsticks: the test set and the word error rate."""
from bench.asr import edit_distance, normalizer, pct, wer
from bench.corpus import VOICES, read_texts


def test_the_test_set_has_at_least_150_varied_utterances_and_three_engines():
    texts = read_texts()
    assert len(texts) >= 150 and len(set(texts)) == len(texts)
    assert sum(t.endswith("?") for t in texts) >= 30  # questions
    assert sum(len(t.split()) >= 25 for t in texts) >= 10  # long sentences
    assert sum(any(f in t.lower().split() for f in ("um,", "uh,", "hmm,")) for t in texts) >= 5  # hesitations
    assert {v.split(":")[0] for v in VOICES} == {"piper", "flite", "espeak"}


def test_the_normalizer_ignores_case_punctuation_fillers_and_how_numbers_are_written():
    norm = normalizer("en")
    assert norm("Um, I paid forty two dollars at seven thirty.") == norm("I paid 42 dollars at 7:30")
    assert norm("Set a timer for fifteen minutes!") == norm("set a timer for 15 minutes")


def test_word_error_rate_counts_substitutions_deletions_and_insertions():
    assert edit_distance("a b c".split(), "a x c d".split()) == 2
    assert wer(["the cat sat"], ["the cat sat"]) == 0.0
    assert abs(wer(["the cat sat on the mat"], ["the cat on a mat"]) - 2 / 6) < 1e-9
    assert pct([1, 2, 3], 50) == 2

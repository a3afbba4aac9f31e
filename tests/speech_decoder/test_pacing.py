"""Groups of text for the voice: early first group, whole clauses after."""
from speech_decoder.pacing import ClauseGrouper, Pacing


def feed(text: str, grouper: ClauseGrouper, step: int = 3) -> list[str]:
    out = []
    for i in range(0, len(text), step):
        out += grouper.push(text[i:i + step])
    return out + grouper.flush()


def test_a_sentence_is_released_as_soon_as_its_end_is_generated():
    g = ClauseGrouper()
    assert g.push("The capital of France is Paris.") == ["The capital of France is Paris."]
    assert g.push(" Is it big?") == ["Is it big?"]


def test_a_period_that_may_not_end_the_sentence_waits_for_the_next_token():
    g = ClauseGrouper()
    assert g.push("The answer is 3.") == []  # a decimal point: 3.5
    assert g.push("5 exactly. ") == ["The answer is 3.5 exactly."]
    assert g.push("Ask Dr.") == []  # a title
    assert g.push(" Lee, she knows.") == ["Ask Dr. Lee, she knows."]
    assert g.push("It is in the U.S.") == []  # an initial
    assert g.push(" Yes") == ["It is in the U.S."]


def test_the_first_group_is_cut_at_an_early_clause_mark():
    groups = feed("Well, to make tea, boil some water, then pour it over the leaves and wait.", ClauseGrouper())
    assert groups[0] == "Well, to make tea,"
    assert " ".join(groups) == "Well, to make tea, boil some water, then pour it over the leaves and wait."


def test_later_clauses_merge_up_to_the_minimum_length():
    groups = feed("Good morning to you. One, two, three, four, five, six, seven, eight, nine, ten, eleven.",
                  ClauseGrouper())
    assert groups[0] == "Good morning to you."
    assert all(len(g) >= Pacing().min_chars for g in groups[1:-1])


def test_a_long_run_without_punctuation_is_cut_at_a_space():
    text = " ".join(["word"] * 100)
    groups = feed(text, ClauseGrouper(Pacing(max_chars=60)))
    assert all(len(g) <= 60 for g in groups)
    assert " ".join(groups) == text


def test_a_lone_short_first_sentence_is_voiced_with_what_follows():
    # "Sure!" alone is over before the next group is synthesized: a hole in the reply.
    assert feed("Sure! The capital of Japan is Tokyo.", ClauseGrouper()) == [
        "Sure! The capital of Japan", "is Tokyo."]
    assert feed("Sure! I can help.", ClauseGrouper()) == ["Sure! I can help."]
    assert feed("Okay.", ClauseGrouper()) == ["Okay."]  # a reply of one short sentence is still voiced
    g = ClauseGrouper()
    assert g.push("Paris is the capital. ") == ["Paris is the capital."]
    assert g.push("Yes. ") == ["Yes."]  # later groups: a sentence end is always a cut


def test_decimal_numbers_are_not_sentence_ends():
    assert feed("Pi is 3.14 roughly. Yes.", ClauseGrouper()) == ["Pi is 3.14 roughly.", "Yes."]


def test_a_long_first_sentence_without_a_comma_is_voiced_from_its_first_phrase():
    groups = feed("The boiling point of water is 100 degrees Celsius at sea level.", ClauseGrouper())
    assert groups[0] == "The boiling point of water"  # cut before "is", where a speaker breathes
    assert " ".join(groups) == "The boiling point of water is 100 degrees Celsius at sea level."


def test_a_first_phrase_is_cut_as_soon_as_the_word_that_starts_the_next_one_is_generated():
    g = ClauseGrouper()
    assert [g.push(t) for t in ("The", " boiling", " point", " of", " water")] == [[]] * 5
    assert g.push(" is") == ["The boiling point of water"]  # not waiting for " 100" to complete "is"
    assert g.push(" 100 degrees.") == ["is 100 degrees."]


def test_a_first_phrase_is_not_cut_after_a_placeholder_subject():
    groups = feed("In an hour, there are sixty minutes and many seconds.", ClauseGrouper())
    assert groups[0] != "In an hour, there"
    assert " ".join(groups) == "In an hour, there are sixty minutes and many seconds."


def test_a_short_first_sentence_stays_whole_and_later_sentences_are_not_cut_at_phrases():
    assert feed("A spider has eight legs. Most of them have eight eyes as well.", ClauseGrouper()) == [
        "A spider has eight legs.", "Most of them have eight eyes as well."]


def test_a_later_sentence_is_cut_at_a_phrase_when_the_voice_is_about_to_run_dry():
    g = ClauseGrouper()
    assert g.push("The ocean is vast. ") == ["The ocean is vast."]
    text = "It stretches across the Earth from the North Pole to the South Pole."
    urgent = []
    for i in range(0, len(text), 3):
        urgent += g.push(text[i:i + 3], urgent=True)
    urgent += g.flush()
    assert urgent[0] == "It stretches across the Earth"  # cut before "from"
    assert " ".join(urgent) == text

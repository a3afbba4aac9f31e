"""The speech decoder: reply text in as it is generated, groups out to the voice."""
import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from speech_decoder.decoder import SpeechDecoder
from speech_decoder.normalize import normalize
from tts.base import SpeechPiece, TTSBackend

SAY_AGAIN = "Sorry, could you say that again?"


class Silent(TTSBackend):
    """A voice that returns 10 ms of silence per group: grouping only is under test."""
    sample_rate = 16000

    def stream(self, text, cancel):
        for t in text:
            yield SpeechPiece(np.zeros(160, np.float32), t)


def voiced(pieces: list[str], say_again: str = SAY_AGAIN) -> tuple[list[str], int, str]:
    """Feed a reply piece by piece as the LLM would, stopping once the decoder
    takes no more text; returns the groups voiced, the pieces taken, and what was
    said instead of the reply."""
    async def run():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            d = SpeechDecoder(Silent(), pool, loop, on_audio=lambda a, t: None, say_again=say_again)
            taken = 0
            for p in pieces:
                d.feed(p)
                taken += 1
                if d.said_instead:
                    break
            d.end()
            await d.done
        return d.spoken_text, taken, d.said_instead

    return asyncio.run(run())


def test_the_decoder_cuts_short_only_while_little_speech_is_ahead():
    async def groups_with(ahead_s: float) -> list[str]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            d = SpeechDecoder(Silent(), pool, loop, on_audio=lambda a, t: None, ahead=lambda: ahead_s)
            d.feed("The ocean is vast. ")
            await asyncio.sleep(0.05)  # the first group's (silent) audio comes back
            for word in "It stretches across the Earth from the North Pole to the South Pole. ".split(" "):
                d.feed(word + " ")
            d.end()
            await d.done
        return d.spoken_text

    assert asyncio.run(groups_with(10.0))[1] == "It stretches across the Earth from the North Pole to the South Pole."
    assert asyncio.run(groups_with(0.0))[1] == "It stretches across the Earth"


def test_a_reply_that_counts_instead_of_talking_is_replaced_as_soon_as_it_is_told():
    """SmolLM2's loop on a misheard turn in the two-agent simulation: '1. 1. 1. 1.'"""
    pieces = ["1."] + [" 1."] * 79
    groups, taken, instead = voiced(pieces)
    assert groups == [SAY_AGAIN] and instead == SAY_AGAIN
    assert taken < 10  # the second number decided it: the rest is not waited for


def test_a_reply_with_nothing_speakable_is_replaced_when_it_ends():
    for pieces in ([], ["```", "python\nx = 1\n", "```"], ["...", " :)"]):
        assert voiced(pieces)[0] == [SAY_AGAIN]


def test_a_lone_number_is_an_answer():
    assert voiced(["8", "."])[0] == ["8."]


def test_a_number_before_the_first_word_is_voiced_with_it():
    groups, _, instead = voiced(["3.14159", "265358979", ".", " That", " is", " pi", "."])
    assert not instead and groups == ["3.14159265358979. That is pi."]


def test_words_after_numbers_are_voiced_as_they_come():
    groups, _, instead = voiced(["It", " is", " 2024", ". ", "2025", " comes", " next", "."])
    assert not instead and " ".join(groups) == "It is 2024. 2025 comes next."


def test_without_a_line_to_say_instead_the_reply_is_voiced_as_it_is():
    assert voiced(["1.", " 1.", " 1.", " 1.", " 1."], say_again="")[0] == [normalize("1. 1. 1. 1. 1.")]
    assert voiced([], say_again="")[0] == []

"""Nothing unspeakable reaches the voice."""
import re

import pytest

from speech_decoder.normalize import CodeFenceFilter, normalize


@pytest.mark.parametrize("text,spoken", [
    ("**Paris** is the _capital_.", "Paris is the capital."),
    ("# Tea\n- boil water\n- steep 3 minutes", "Tea. boil water. steep 3 minutes."),
    ("1. First\n2. Second", "First. Second."),
    ("See [the docs](https://example.com) or https://x.org/a?b=c", "See the docs or a link"),
    ("Use `print()` here", "Use print() here"),
    ("It costs $1,250.50 & takes 20%", "It costs 1250.50 dollars and takes 20 percent"),
    ("It is 21°C today", "It is 21 degrees Celsius today"),
    ("yes/no", "yes or no"),
    ("Great!!! 🎉😀", "Great!"),
    ("a -> b", "a to b"),
])
def test_markdown_symbols_and_emoji_become_plain_words(text, spoken):
    assert normalize(text) == spoken


def test_text_with_nothing_to_say_normalizes_to_empty():
    assert normalize("*** --- ###") == ""
    assert normalize("🎉") == ""


def test_the_output_alphabet_is_only_words_digits_and_plain_punctuation():
    messy = "## H€llo <b>world</b> {x: [1, 2]} | ~~strike~~ \\ ^ ✓ ★"
    assert re.fullmatch(r"[\w\s.,;:!?'\"()\-]*", normalize(messy))


def test_fenced_code_is_dropped_even_when_fences_are_split_across_tokens():
    f = CodeFenceFilter()
    tokens = ["Here is how.", " `", "``py", "thon\nprint(1)\n`", "``", " Done."]
    said = "".join(f.push(t) for t in tokens) + f.flush()
    assert "print" not in said
    assert said.replace("  ", " ") == "Here is how. Done."


def test_inline_backticks_pass_the_fence_filter():
    f = CodeFenceFilter()
    assert "".join(f.push(t) for t in ["use `x`", " now"]) + f.flush() == "use `x` now"

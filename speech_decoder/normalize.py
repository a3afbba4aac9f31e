"""Make LLM text speakable.

The chat model is a coder tune: even with a spoken-style system prompt it may
write markdown, lists, code or symbols. Nothing unspeakable may reach TTS, so
every group of text passes through ``normalize`` on its way to the voice, and
``CodeFenceFilter`` drops fenced code blocks from the token stream before it is
cut into groups.
"""
from __future__ import annotations

import re

_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)
_INLINE_CODE = re.compile(r"`([^`]*)`")
_LINE_MARKUP = re.compile(r"^\s*(?:#{1,6}\s+|[-*+•]\s+|\d+[.)]\s+|>\s*)", re.MULTILINE)
_EMPHASIS = re.compile(r"[*_~`#|<>\[\]{}\\^]")
_MONEY = re.compile(r"([$€£])\s?(\d[\d,]*(?:\.\d+)?)")
_CURRENCY = {"$": "dollars", "€": "euros", "£": "pounds"}
_SYMBOLS = {
    "&": " and ", "%": " percent", "+": " plus ", "=": " equals ", "@": " at ",
    "°C": " degrees Celsius", "°F": " degrees Fahrenheit", "°": " degrees",
    "→": " to ", "->": " to ", "=>": " to ", "×": " times ", "/": " or ",
}
# What may reach the voice: letters (any script), digits, spaces and plain punctuation.
_UNSPEAKABLE = re.compile(r"[^\w\s.,;:!?'\"()\-]", re.UNICODE)
_SPACES = re.compile(r"[ \t]+")


def _line_ends_to_sentences(text: str) -> str:
    # A list item or heading ends without punctuation; give the voice a pause there.
    lines = [ln.strip() for ln in text.split("\n")]
    out = []
    for ln in lines:
        if ln and ln[-1] not in ".,;:!?":
            ln += "."
        out.append(ln)
    return " ".join(ln for ln in out if ln)


def normalize(text: str) -> str:
    """Markdown, URLs, symbols and emoji -> plain words the TTS can say."""
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("a link", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _LINE_MARKUP.sub("", text)
    text = _MONEY.sub(lambda m: f"{m.group(2).replace(',', '')} {_CURRENCY[m.group(1)]}", text)
    text = re.sub(r"(\d),(\d{3})", r"\1\2", text)  # 1,000 -> 1000 (read as a number)
    for sym in sorted(_SYMBOLS, key=len, reverse=True):
        if sym == "/":
            text = re.sub(r"(?<=[A-Za-z])/(?=[A-Za-z])", " or ", text)
        else:
            text = text.replace(sym, _SYMBOLS[sym])
    text = _EMPHASIS.sub("", text)
    text = _line_ends_to_sentences(text) if "\n" in text else text
    text = _UNSPEAKABLE.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    text = re.sub(r"([.,;:!?])\1+", r"\1", text)
    return "" if not re.search(r"\w", text) else text


class CodeFenceFilter:
    """Drops ```fenced``` blocks from a token stream, across token boundaries."""

    def __init__(self) -> None:
        self._inside = False
        self._held = ""  # trailing backticks that may start or end a fence

    def push(self, text: str) -> str:
        text = self._held + text
        self._held = ""
        out = []
        while text:
            i = text.find("```")
            if i < 0:
                # Keep a trailing run of 1-2 backticks until we know if it is a fence.
                tail = len(text) - len(text.rstrip("`"))
                keep, self._held = (text[:-tail], text[-tail:]) if tail else (text, "")
                if not self._inside:
                    out.append(keep)
                break
            if not self._inside:
                out.append(text[:i])
            self._inside = not self._inside
            text = text[i + 3:]
        return "".join(out)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self._inside else held

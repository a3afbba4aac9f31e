"""Which text goes to TTS when.

The voice speaks a group of words at a time. Small groups start the audio
sooner; whole clauses sound natural. ``ClauseGrouper`` takes the reply as it is
generated and releases a group at a sentence end, at clause punctuation once the
group is long enough, or at a space once it grows too long. The first group of a
reply may be shorter than the rest: that is the group whose synthesis everyone
waits for; a first sentence with no comma is cut before a word that starts a
phrase ("is", "of", "because"...) once a few words are in, and a first sentence
shorter than that ("Sure!") is joined to what follows. Later groups are cut
the same way when the voice is about to run dry (``push(..., urgent=True)``):
a long sentence generated slowly would otherwise leave a gap in the speech.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")
# A sentence end at the very end of the text so far, ended without waiting for the
# next token (a token's decoding, ~40 ms, on the path to the first audio): "!" or
# "?", or a period after a word of letters; not after a digit ("3." may be 3.5),
# an initial ("U.S.") or a title ("Dr.").
_SENTENCE_END_NOW = re.compile(r"(?:[!?]+|(?<=[^\W\d_]{2})\.)$")
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs prof approx".split())
_CLAUSE_END = re.compile(r"[,;:]+(?=\s)|\s[-–—]+(?=\s)")


# Words a phrase starts with: a long first sentence with no comma may be voiced in
# two parts, cut just before one of these ("The boiling point of water | is 100
# degrees"), which is where a speaker would take a breath anyway.
_PHRASE_STARTS = frozenset("""is are was were has have had can could will would should may might must
of in on at for with to from by about into and but or so because which that who when where if than""".split())
# ... but not right after a word that cannot end one ("In an hour, there | are 60
# minutes": the cut would leave the subject's placeholder hanging).
_NO_CUT_AFTER = frozenset("there here it this that these those they he she we you i what which who".split())


@dataclass(frozen=True)
class Pacing:
    first_min_chars: int = 12  # first group: release at a clause mark once this long
    first_phrase_words: int = 4  # ... or before a phrase start once this many words (0: off)
    min_chars: int = 40  # later groups: merge short clauses up to this length
    max_chars: int = 160  # never hold more than this without a break


def _after_title(text: str, i: int) -> bool:
    """The period at ``text[i]`` ends a title or abbreviation ("Dr.", "vs."), not a sentence."""
    words = text[:i].split()
    return text[i] == "." and bool(words) and words[-1].lower() in _ABBREVIATIONS


class ClauseGrouper:
    def __init__(self, pacing: Pacing = Pacing()):
        self.pacing = pacing
        self._buf = ""
        self._groups_out = 0
        self._urgent = False

    def _min(self) -> int:
        return self.pacing.first_min_chars if self._groups_out == 0 or self._urgent else self.pacing.min_chars

    def _cut(self) -> int | None:
        """Index just after the best place to end the next group, or None to wait."""
        buf = self._buf
        ends = [m.end() for m in _SENTENCE_END.finditer(buf) if not _after_title(buf, m.start())]
        if _SENTENCE_END_NOW.search(buf) and not _after_title(buf, len(buf) - 1):
            ends.append(len(buf))
        for end in ends:
            # A first sentence shorter than a first group ("Sure!") waits for what
            # follows: voiced alone it is over before the next group is ready, and the
            # reply starts with a hole (measured over WebRTC: "Sure!", then 1.9 s of silence).
            if self._groups_out or end >= self.pacing.first_min_chars:
                return end
        best = None
        for m in _CLAUSE_END.finditer(buf):
            if m.end() >= self._min():
                best = m.end()
                break
        if best is None and (self._groups_out == 0 or self._urgent) and self.pacing.first_phrase_words:
            best = self._phrase_cut()
        if best is None and len(buf) > self.pacing.max_chars:
            space = buf.rfind(" ", 0, self.pacing.max_chars)
            best = space if space > 0 else self.pacing.max_chars
        return best

    def _phrase_cut(self) -> int | None:
        """Index just before the first phrase start that follows enough words, as
        soon as its token is in. It is not waited on to be complete: " is" may yet
        become " island", but the cut is still between two words, and waiting for
        the next token cost a token's decoding (50-90 ms) on the way to the first
        audio of most replies."""
        words = list(re.finditer(r"\S+", self._buf))
        for i, m in enumerate(words):
            if (i >= self.pacing.first_phrase_words and m.group().lower() in _PHRASE_STARTS
                    and words[i - 1].group().lower().strip(",;:") not in _NO_CUT_AFTER):
                return m.start()
        return None

    def push(self, text: str, urgent: bool = False) -> list[str]:
        """Add generated text; return the groups now ready (maybe none). ``urgent``:
        the voice is about to run out, cut as for a first group."""
        self._buf += text
        self._urgent = urgent
        groups = []
        while (cut := self._cut()) is not None:
            group, self._buf = self._buf[:cut].strip(), self._buf[cut:].lstrip()
            if group:
                groups.append(group)
                self._groups_out += 1
        return groups

    def flush(self) -> list[str]:
        """The reply has ended: whatever is left is the last group."""
        rest, self._buf = self._buf.strip(), ""
        return [rest] if rest else []

"""Typed, immutable events of a conversation, each stamped with media time.

``t`` is seconds on the conversation's one timeline (the same one as
``conversation.wav``). Events are what a session reports; they are written one
JSON object a line to ``events.jsonl`` and read back by benchmarks.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable


@dataclass(frozen=True)
class Event:
    t: float
    type: ClassVar[str] = "event"

    def to_dict(self) -> dict:
        d = {"t": round(self.t, 4), "type": self.type}
        for k, v in dataclasses.asdict(self).items():
            if k != "t":
                d[k] = round(v, 4) if isinstance(v, float) else v
        return d


@dataclass(frozen=True)
class StateChanged(Event):
    """The session's state: listening, thinking, speaking (and, when cut off, interrupted)."""

    state: str
    type: ClassVar[str] = "state"


@dataclass(frozen=True)
class Decision(Event):
    """What the session decided at the end of a chunk, and in which state.

    decisions: endpoint (the user's turn is over), speculate (start the reply
    during a pause, unplayed), resume (the user went on: drop it), hold or duck
    (the user may be cutting in: the voice pauses, or drops 12 dB), release (the
    cut-in paused without words: the voice goes on), hum (Whisper heard a hum,
    not words: the voice goes on while the cut-in is still judged), reject
    (short speech while speaking: carry on), interrupt (barge-in: stop),
    carry_on (the cut-in that stopped the agent held no words: it says the rest
    of the reply it was cut off in). With
    the state head, its label on every chunk of the user's words: continue,
    interrupt (while listening: the turn is over, answer it) or reject (ignore
    the activation), with ``probs``; timeout: a pause ended the turn although
    the head said continue.
    """

    decision: str
    state: str
    probs: dict | None = None  # class probabilities, when a learned head decided
    type: ClassVar[str] = "decision"


@dataclass(frozen=True)
class UserSpeechStart(Event):
    type: ClassVar[str] = "user_speech_start"


@dataclass(frozen=True)
class UserSpeechEnd(Event):
    type: ClassVar[str] = "user_speech_end"


@dataclass(frozen=True)
class TranscriptEvent(Event):
    text: str
    no_speech_prob: float = 0.0
    type: ClassVar[str] = "transcript"


@dataclass(frozen=True)
class PartialTranscript(Event):
    """The streaming transcript of the turn in progress (when it changed)."""

    committed: str
    tentative: str
    type: ClassVar[str] = "partial_transcript"


@dataclass(frozen=True)
class TranscriptRejected(Event):
    """Whisper heard nothing worth answering (silence, noise, a stock hallucination)."""

    text: str
    reason: str
    type: ClassVar[str] = "transcript_rejected"


@dataclass(frozen=True)
class AgentText(Event):
    """A group of the reply's text sent to the voice."""

    text: str
    type: ClassVar[str] = "agent_text"


@dataclass(frozen=True)
class AgentSpeechStart(Event):
    type: ClassVar[str] = "agent_speech_start"


@dataclass(frozen=True)
class AgentSpeechEnd(Event):
    reason: str  # "finished" | "interrupted"
    type: ClassVar[str] = "agent_speech_end"


@dataclass(frozen=True)
class Turn(Event):
    """One exchange, reported when the agent's reply has ended."""

    index: int
    user_text: str
    agent_text: str  # what the user actually heard
    user_end: float  # media time the user stopped speaking, s
    agent_start: float  # media time the first reply audio played, s
    latency: float  # agent_start - user_end, s
    interrupted: bool
    asr_ms: float  # stage times, wall clock
    llm_first_token_ms: float
    first_audio_ms: float  # from the end of ASR to the first synthesized audio
    prefill_tokens: int
    stop_latency: float | None = None  # interrupted turns: user onset -> agent silent, s
    underruns: int = 0  # ticks the voice fell behind while speaking
    type: ClassVar[str] = "turn"


def write_jsonl(path: Path, events: Iterable[Event]) -> None:
    with open(path, "w") as f:
        for e in events:
            f.write(json.dumps(e.to_dict()) + "\n")

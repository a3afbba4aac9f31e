"""One conversation: its state machine, history and output, driven chunk by chunk.

A transport calls ``step(user_audio)`` with the user's audio for media time
[now, now + n) and gets back n samples of the agent's, to be played over the
next n: one chunk T per call (agent/clock.py), or ``io_ms`` at a time (one 20 ms
frame by default), so that a cut-in is held, judged and let go, and a reply
starts, within a frame instead of a chunk. While the agent is silent, the turn
is heard once per chunk (and once more as soon as the user falls silent).
``step`` only does bookkeeping:
endpointing, deciding, and starting or cancelling a reply. The reply itself
(Whisper, the LLM, the voice) runs in the engine's worker threads and drops its
audio into the outbox; a tick takes whatever audio is ready and plays silence
otherwise.

States: listening -> (user turn ends) thinking -> (first audio plays) speaking
-> (audio ends) listening.
- Streaming (the default): while the user speaks, every chunk goes to a
  ``UserTurn`` (agent/turn.py) in the model thread: the words are transcribed
  as they come, fed into the LLM's cache, and the state head judges them. Its
  *interrupt* ends the turn (the reply then finds its prompt prefilled), its
  *reject* drops the activation (a cough, an "mm-hmm"), *continue* waits; a
  pause of ``max_pause_ms`` ends the turn whatever the head says (a turn with no
  words yet ends at the endpointer's silence). The answer to a statement (not a
  question or a request) plays only after ``statement_gap_ms`` of silence.
- Without streaming, the endpointer's silence ends the turn and Whisper
  transcribes it whole. Speculative start: after ``speculate_ms`` of silence the
  reply is already computed, but it is only played once the turn is confirmed
  over; if the user goes on, the work is dropped.
- User speech while thinking: the user was not done; the reply is dropped and
  the turn goes on.
- User speech while speaking (a cut-in): the agent's voice holds at once, as
  a person falls silent when talked over (``cut_in="hold"``; or is ducked 12 dB,
  ``"duck"``). The state head judges the cut-in's words as they come: interrupt
  stops the reply (the history keeps only the words the user heard) and the
  cut-in becomes the user's turn; reject (a backchannel, a cough) or a cut-in
  that ends without a verdict lets the voice go on from where it held. Without
  the head, ``barge_in_ms`` of speech is a barge-in.
- Speech well below the level of the user's own voice (``distant_db``: a TV in
  the next room, somebody talking to somebody else) is not addressed to the
  agent: it neither holds the voice nor opens a turn.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from agent.clock import TickRecord, Timeline
from agent.config import SAMPLE_RATE, VAD_FRAME_MS
from agent.engine import Engine, light_torch_thread
from agent.events import (AgentSpeechEnd, AgentSpeechStart, AgentText, Decision, Event, PartialTranscript,
                          StateChanged, TranscriptEvent, TranscriptRejected, Turn, UserSpeechEnd, UserSpeechStart)
from agent.heads import Timing, load_phrases, normalize
from agent.llm import PrefixCache
from agent.turn import UserTurn
from speech_decoder.decoder import SpeechDecoder
from speech_encoder.asr import Transcript, is_hallucination
from speech_encoder.streaming import StreamingOptions
from speech_encoder.vad import FRAME_SAMPLES, Endpointer, VadEvent

log = logging.getLogger(__name__)
PRE_ROLL_S = 0.2  # audio kept from before the detected onset, so Whisper hears it
DUCK_GAIN = 0.25  # -12 dB: the agent lowers its voice while the user may be cutting in
# A cut-in that has gone quiet this long without claiming the floor has ended
# (the endpointer's own end of speech takes longer: a held voice must not wait for it).
CUT_IN_PAUSE_MS = 200
PAUSE_JUDGE_MS = 200  # voice before such a pause that may be words: held for its verdict
LEVEL_FLOOR_DB = -55.0  # frames quieter than this are not part of anybody's voice level
ACTIVE_DB = 20.0  # ... nor those this far below the loudest of the same speech
RAMP_SAMPLES = SAMPLE_RATE // 100  # 10 ms gain ramps: no click at a duck, un-duck or stop
# Whisper's mean log-probability below which a cut-in's transcript is a guess, not
# words (measured on flite speech, tiny.en: a hummed "mm-hmm" comes out as "N",
# "and image and" at -1.6 to -4.0; "Wait" at -0.9 from 0.6 s of audio).
CUT_IN_MIN_LOGPROB = -1.5
# ... except a guess that is a word for "stop": Whisper is unsure of a lone "Stop." or
# "Wait..." (mean log-probability -1.5 to -2.9 from 0.5-0.9 s of piper, flite and
# espeak speech), and treating it as a guess let the voice go on over it at the pause
# that follows (5 of 29 late stops over WebRTC, 2026-11-28). Those words go to the
# state head; talking over "stop" costs more than holding the voice for a misheard cough.
STOP_WORD = r"\W*(stop|wait|hold on|hold it|hold up|hang on)\b"
STOP_WORDS = re.compile(STOP_WORD, re.IGNORECASE)
# ... and a cut-in that so far is only such words: stop, or wait for the rest of it.
STOPS = re.compile(rf"({STOP_WORD})+\W*", re.IGNORECASE)
# A cut-in that so far is only one of these claims the floor: its words come after a breath.
# Fillers around them change nothing: "Actually, um-" judged reject (0.59) let a held
# voice go on over "... how many legs does a dog have?" (WebRTC, 2026-11-29).
_CLAIM = r"actually|sorry|excuse me|hey|listen|one second|quick question"
_FILLER = r"um+|uh+|erm|er|hmm+"
CLAIMS = re.compile(rf"(\W*({_FILLER})\b)*(\W*({_CLAIM})\b)+(\W*({_CLAIM}|{_FILLER})\b)*\W*", re.IGNORECASE)
# Previous text for Whisper on a cut-in: with fillers in the prompt it spells a hum
# as one ("M-m-", "Uh-h") instead of inventing words ("and then major"); measured
# on the bench's flite/espeak/piper backchannels and cut-ins, the words of the
# cut-ins came out the same.
CUT_IN_PROMPT = " Mm-hmm. Uh-huh. Hmm, okay."
HUM_LETTERS = frozenset("mhnu")  # "mm", "hmm", "mhm", "uh-huh", "nn": voice without words
# A reject on less voice than this while the user is still talking waits for more
# (the first syllables of "Wait, stop" come out as "W-s", which the head rejects).
REJECT_RELEASE_MS = 480
# ... and so does an interrupt less sure than this (a flite "mm-hmm" and "uh-huh" were
# judged interrupt at 0.69-0.70 on their first 200-300 ms, cut-ins 0.57-1.0).
SURE_INTERRUPT = 0.8
# ... and a cut-in that is over or has stopped, with no more voice than this, that asks
# nothing and is judged interrupt less surely, was a backchannel: the agent goes on.
# In replay runs of the bench, every such verdict on a cut-in over was one ("Yeah."
# at 0.80, "and I'm on" at 0.68, mm-hmm heard as "and anthem" at 0.64-0.73), and each
# cost a resume 0.9-1.2 s late; the cut-ins over when judged interrupt were sure of
# it (0.93-1.0). A "yeah" judged in its pause, before the endpointer closed it, and an
# "mm-hmm" judged as it stopped came to the same ("You're", 0.80; "And enter.", 0.73).
BACKCHANNEL_MAX_MS = 1200
# While the agent is silent the head learned to reject fillers ("um") and Whisper's
# transcripts of noise ("Thank you for watching."), none longer than this
# (agent/heads_data/phrases.txt). A reject of more words is outside what it learned,
# and a turn rejected is never answered: SmolLM2's head rejected an 11-word statement
# at 0.55 in the two-agent simulation, and both agents then waited in silence to the
# end. Such a turn is left open; the head's interrupt or ``max_pause_ms`` ends it.
LISTEN_REJECT_MAX_WORDS = 6
# What a listener says to show they follow ("I see", "okay", "mm-hmm"): the
# backchannels of the heads' phrase list. Said over the agent and nothing after
# it, it is one whatever the head's confidence: flite awb's "I see." was judged
# interrupt at 0.90 in every bench run of 2026-11-28 and the night after.
BACKCHANNELS = frozenset(normalize(p) for p in load_phrases()[0]["backchannel"])
BACKCHANNEL_WORDS = max(len(p.split()) for p in BACKCHANNELS)  # the longest listed, in words
# ... and so is a cut-in of a word or two that asks nothing, says no word for stop
# and no "no", and claims nothing: a nod, or Whisper's words for one through a
# codec ("You're" for flite's "yeah", "And then," for "mm-hmm", judged interrupt at
# 0.83-0.98 in the 2026-11-29 bench runs, replay and WebRTC alike).
NOD_MAX_WORDS = 2
NEGATION = re.compile(r"\W*(no|nope|nah|not|never|don't|do not)\b", re.IGNORECASE)
# How a question or a request to the agent begins; a turn that begins otherwise ("So
# my sister is moving next month.") is a statement, and its speaker may go on.
# A wh-word before a subject opens a clause, not a question ("When I was a child...").
ASKS = re.compile(r"\W*((what|how|who|whom|whose|why|where|when|which)\b(?!\W+(i|we|you|he|she|they|my|our|your)\b)|"
                  r"(is|are|am|was|were|do|does|did|"
                  r"can|could|will|would|should|shall|may|have|has|tell|give|show|name|explain|"
                  r"describe|list|say|please|help|let's|let|find|define|recommend|suggest|translate)\b)",
                  re.IGNORECASE)
# ... after any of these openers ("Sorry, actually, how many days are in a week")
OPENERS = re.compile(r"(\W*(sorry|actually|wait|stop|no|oh|ok|okay|so|and|but|well|hey|um|uh|then|now)\b)+",
                     re.IGNORECASE)
# Frames of voice (levels) the distance rule waits for; soft first syllables are
# not a quiet speaker. In the bench's 30 cut-ins (speech_level_db against the
# request's), flite's "Stop," and "Wait," were 9-15 dB below the voice over their
# first 10 frames, and every cut-in within 3 dB of it from 15 on; its side talk
# (-8 dB) was 3.3-13 dB below from 10 frames on.
LEVEL_FRAMES = 15
# ... and that a first guess of it goes by, to hold the voice at once.
EARLY_LEVEL_FRAMES = 4
# Voiced frames (of the endpointer's last 10) that hold the voice before they open a
# cut-in (5): a stop 40 ms sooner; a click or a cough that stays below it holds nothing.
HOLD_ONSET_FRAMES = 3
# The first frames of a word are softer than the voice: a guess on them calls it
# somebody else's only this much further below (side talk at -15 dB still is).
EARLY_MARGIN_DB = 6.0
# A hiss is softer still: the s of the bench's piper, flite and espeak voices was
# 10-20 dB below their vowels (energy above 3 kHz: 70-100% of its frames', 0-10%
# of a vowel's). A guess counts it this much up (onset_levels_db). Side talk at
# -8 dB that opens on one is then held for, as that which opens on a vowel was (the
# full rule lets it go); the next room's (-15 dB, walls take the hiss) is not.
SIBILANT_HZ = 3000
SIBILANT_SHARE = 0.6
SIBILANT_DB = 10.0
END_STEP_MS = StreamingOptions.end_step_ms  # the user's silence before the transcriber's end step
# An opener alone ("Actually,") that ended keeps the voice held this long after it
# for the words it announces (the endpointer ends a cut-in after 0.4 s of silence;
# a breath after "Actually," can be longer, and the voice went on into the words).
CLAIM_WAIT_S = 1.0
FIRST_GROUP_WAIT_S = 0.5  # the most the LLM waits for the first group's synthesis (~0.1 s)


def _frames(audio: np.ndarray) -> np.ndarray:
    n = len(audio) // FRAME_SAMPLES
    return np.asarray(audio[:n * FRAME_SAMPLES], dtype=np.float64).reshape(n, -1)


def frame_levels_db(audio: np.ndarray) -> np.ndarray:
    """Levels (dB) of the 20 ms frames of ``audio`` that are above the floor."""
    db = 10 * np.log10(np.mean(np.square(_frames(audio)), axis=1) + 1e-12)
    return db[db > LEVEL_FLOOR_DB]


def onset_levels_db(audio: np.ndarray) -> np.ndarray:
    """``frame_levels_db`` for a first guess at who is speaking, on a word's first
    frames: a hiss (most of a frame's energy above SIBILANT_HZ: the s of "Stop",
    "Sorry") counts SIBILANT_DB up, at about the level of the vowels it comes
    before. On its hiss alone, a flite "Stop," had been taken for somebody else
    and the voice held 0.16-0.24 s late, on its vowel."""
    frames = _frames(audio)
    power = np.square(np.abs(np.fft.rfft(frames * np.hanning(FRAME_SAMPLES), axis=1)))
    high = np.fft.rfftfreq(FRAME_SAMPLES, 1 / SAMPLE_RATE) >= SIBILANT_HZ
    share = power[:, high].sum(axis=1) / np.maximum(power.sum(axis=1), 1e-20)
    db = 10 * np.log10(np.mean(np.square(frames), axis=1) + 1e-12)
    return (db + SIBILANT_DB * (share >= SIBILANT_SHARE))[db > LEVEL_FLOOR_DB]


def speech_level_db(levels) -> float:
    """The level of speech from its frame levels: the 90th percentile of those within
    ACTIVE_DB of the loudest, so that the gaps between its words do not lower it (a
    pause after "Stop," had taken a cut-in 5 dB down, under the distance margin)."""
    levels = np.asarray(levels, dtype=np.float64)
    return float(np.percentile(levels[levels >= levels.max() - ACTIVE_DB], 90))


def hum(text: str) -> bool:
    """Whisper's spelling of a hum, a backchannel sound or a noise: letters with no
    word among them ("M-M-H-N", "MM MM", "Uh-huh", "N."). The held voice goes
    on; the cut-in is still judged if words follow ("Mm, wait..."). Too few of
    the letters of a hum ("W-s", "N.") may be the start of a word."""
    tokens = re.findall(r"\w+", text)
    if not all(t.isascii() and t.isalpha() and (len(t) == 1 or set(t.lower()) <= HUM_LETTERS) for t in tokens):
        return False
    letters = "".join(tokens).lower()
    humming = sum(c in HUM_LETTERS for c in letters)
    return humming >= 2 and 3 * humming >= 2 * len(letters)


def asks(text: str) -> bool:
    """The user's words ask something of the agent: a question or a request (not
    a statement, after which its speaker may go on)."""
    text = text.strip()
    if text.endswith("?"):
        return True
    opener = OPENERS.match(text)
    return bool(ASKS.match(text[opener.end():] if opener else text))


def is_backchannel(text: str) -> bool:
    """``text`` is one backchannel or a few in a row ("Okay, I see.", "Yeah, yeah, yeah.")."""
    words = normalize(text).split()
    # fits[i]: the first i words are whole backchannels
    fits = [True] + [False] * len(words)
    for i in range(1, len(words) + 1):
        fits[i] = any(fits[j] and " ".join(words[j:i]) in BACKCHANNELS
                      for j in range(max(0, i - BACKCHANNEL_WORDS), i))
    return bool(words) and fits[-1]


def is_nod(text: str) -> bool:
    """``text``, said over the agent, acknowledges it: listed backchannels, or a word
    or two that asks, stops, refuses and claims nothing."""
    if is_backchannel(text):
        return True
    n = len(normalize(text).split())
    return (0 < n <= NOD_MAX_WORDS and not asks(text) and not STOP_WORDS.match(text)
            and not NEGATION.match(text) and not CLAIMS.match(text))


def read_verdict(label: str, probs: dict | None, text: str, *, ended: bool, paused: bool, stopped: bool,
                 distant: bool, voiced_ms: int) -> tuple[str, bool]:
    """What the state head's verdict on a cut-in over the agent's voice comes to.

    ``text``: the cut-in's words so far; ``ended``: it is over; ``paused``: it has
    paused (CUT_IN_PAUSE_MS); ``stopped``: its voice has stopped, if only as long as
    the transcriber's end step waits (END_STEP_MS; a pause has stopped too);
    ``distant``: its level says somebody else; ``voiced_ms``: the voice judged (not
    the voice by the time the verdict came: a judgment takes 0.15-0.25 s, and
    "mm-hmm" judged on 280 ms was past 480 ms by then). Returns the label to act on
    and whether the cut-in claims the floor (its words are still to come)."""
    stops = bool(STOPS.fullmatch(text))
    if label != "interrupt" and stops and ended:
        label = "interrupt"  # "Stop." and silence: whatever else the head thought, stop
    if label == "interrupt" and distant:
        # Its level proved it somebody else while it was judged (over WebRTC a
        # judgment begun before that stopped the voice for side talk, 2026-11-28).
        label = "reject"
    unsure = (label == "interrupt" and probs is not None and probs["interrupt"] < SURE_INTERRUPT
              and not STOP_WORDS.match(text))
    if label == "interrupt" and voiced_ms < BACKCHANNEL_MAX_MS and is_nod(text):
        # "Okay." over the agent is a nod; "Okay, so what about..." is a cut-in: a
        # pause tells them apart (the voice stays held until one comes; the head
        # unsure, a stop is enough, as below).
        over = ended or paused or stopped and unsure
        return ("reject" if over else "continue"), False
    if unsure and not ended and not paused and voiced_ms < REJECT_RELEASE_MS:
        label = "continue"  # a syllable or two, unsure: the held voice waits for more of it
    elif unsure and (ended or stopped) and voiced_ms < BACKCHANNEL_MAX_MS and not asks(text):
        label = "reject"  # over (or stopped), short, asking nothing, and the head unsure: a backchannel
    # "Stop," or "Wait," and a pause, or "Actually...": the words follow, held for
    # (unless somebody else said it).
    claims = label != "interrupt" and not distant and (stops or bool(CLAIMS.fullmatch(text)))
    return ("continue" if claims else label), claims


class State(enum.Enum):
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


class Outbox:
    """The agent's synthesized audio waiting to be played, with group markers."""

    def __init__(self) -> None:
        self._pieces: deque[tuple[np.ndarray, str]] = deque()
        self.samples = 0

    def put(self, audio: np.ndarray, text: str) -> None:
        self._pieces.append((audio, text))
        self.samples += len(audio)

    def pop(self, n: int) -> tuple[np.ndarray, int, list[str], int]:
        """Up to n samples, zero-padded to n.

        Returns (chunk, real samples, groups completed, samples played after the
        last completed group's end).
        """
        out = np.zeros(n, np.float32)
        filled, done, tail = 0, [], 0
        while self._pieces and (filled < n or not len(self._pieces[0][0])):
            audio, text = self._pieces[0]
            take = min(n - filled, len(audio))
            out[filled:filled + take] = audio[:take]
            filled, tail = filled + take, tail + take
            if take == len(audio):
                self._pieces.popleft()
                if text:
                    done.append(text)
                    tail = 0
            else:
                self._pieces[0] = (audio[take:], text)
        self.samples -= filled
        return out, filled, done, tail

    def peek(self, n: int) -> np.ndarray:
        """A copy of the next n samples (fewer if fewer are queued), left queued."""
        parts, need = [], n
        for audio, _ in self._pieces:
            if need <= 0:
                break
            parts.append(audio[:need])
            need -= len(parts[-1])
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def clear(self) -> None:
        self._pieces.clear()
        self.samples = 0


@dataclass
class Reply:
    """The agent's answer to one user turn, from transcription to last sample."""

    user_end: float
    audio: np.ndarray  # the user's turn, kept so a dropped reply's audio can rejoin it
    confirmed: bool = True  # False while speculative: computed, not yet played
    turn: UserTurn | None = None  # streaming: the turn whose words are already in the LLM
    rest: np.ndarray | None = None  # ... and its audio not yet heard by the transcriber
    heard_until: float = 0.0  # media time up to which ``audio`` goes
    cancel: threading.Event = field(default_factory=threading.Event)
    decoder: SpeechDecoder | None = None
    user_text: str = ""
    generated: str = ""
    played_groups: list[str] = field(default_factory=list)
    played_in_group: int = 0  # samples of the current (unfinished) group already played
    group_samples: list[int] = field(default_factory=list)  # total samples of each group
    pending_samples: int = 0  # samples of the group still being delivered
    agent_start: float | None = None
    synth_done: bool = False
    underruns: int = 0
    asr_ms: float = 0.0
    llm_first_token_ms: float = 0.0
    first_audio_ms: float = 0.0
    prefill_tokens: int = 0
    t_asr_done: float = 0.0
    # The user's onset (``Session._cut_in_id``) whose speech the VAD had not yet
    # closed when the turn was judged over; None: it had.
    open_utterance: int | None = None
    # Says the rest of a reply a cut-in stopped; the groups of it heard whole before
    # the cut (the history joins the two into one answer). None: a reply of its own.
    resumes: str | None = None


@dataclass
class SessionStats:
    underruns: int = 0  # ticks a speaking reply had no audio ready
    interruptions: int = 0
    false_stops: int = 0  # barge-ins whose user speech held no words
    speculative_dropped: int = 0
    stop_latencies: list[float] = field(default_factory=list)  # user onset -> agent silent, s


class Session:
    def __init__(self, engine: Engine, on_event: Callable[[Event], None] | None = None,
                 system_prompt: str | None = None):
        self.engine = engine
        self.config = cfg = engine.config
        light_torch_thread()  # made on the event loop's thread, which runs the state heads' MLP
        self.system_prompt = system_prompt or cfg.system_prompt  # a persona may replace the default
        self.now = 0.0  # media time at the start of the next user audio, s
        self._in_chunk = 0  # samples of the current chunk consumed so far
        self._step_n = cfg.chunk_samples  # samples of the last step: the agent audio already handed out
        self._tick_energy = [0.0, 0.0]  # the chunk's user and agent sums of squares (the timeline's levels)
        self.events: list[Event] = []
        self.timeline = Timeline()
        self.stats = SessionStats()
        self._on_event = on_event
        self._endpointer = Endpointer(cfg.vad_aggressiveness, cfg.speech_start_ms, cfg.endpoint_silence_ms)
        self._recent: deque[tuple[float, np.ndarray]] = deque(maxlen=int(0.5 * SAMPLE_RATE / FRAME_SAMPLES))
        self._utterance: list[np.ndarray] | None = None  # frames of the user turn in progress
        self._held: list[np.ndarray] = []  # an ended turn whose reply was dropped: the user went on
        self._held_until = 0.0  # ... up to this media time
        self._turn: UserTurn | None = None  # streaming: the user's turn being heard
        self._turn_count = 0
        self._user_onset = 0.0
        self._outbox = Outbox()
        self._reply: Reply | None = None
        self._tasks: set[asyncio.Task] = set()
        self._agent_audio_end = 0.0
        self._gain = self._gain_target = 1.0
        self._tail: np.ndarray | None = None  # a fade-out still to play after a stop
        # The reply the last interruption cut off (its groups heard whole, and the rest
        # from the group it cut), while that cut-in's speech is not yet transcribed: if
        # it proves empty, the rest is said.
        self._cut_off: tuple[str, str] | None = None
        self._holding = False  # the voice is held for a cut-in: nothing is played, nothing is lost
        self._hold_faded = False  # ... and the fade to silence has gone out
        self._hold_t = 0.0  # media time the held voice fell silent
        # Levels (dB) of the current activation's frames, and of the user's turns answered so far.
        self._levels: deque[float] = deque(maxlen=250)
        self._voice_levels: deque[float] = deque(maxlen=5)
        self._turn_onset = 0  # the onset (``_cut_in_id``) that opened the current turn
        # Judging a cut-in with the state head (agent/heads.py), one at a time:
        self._cut_in_id = 0  # counts user onsets, so a late verdict on an old cut-in is ignored
        self._judging = False
        self._judged_reject = False  # the head's latest verdict on the current cut-in: not for the agent
        self._judge_after_ms = 0  # voiced ms before the next judgment of the same cut-in
        self._judged_voiced_ms = 0  # voiced ms of the cut-in when it was last judged
        self._yielded = False  # the voice has held (or ducked) for the current cut-in
        self._cut_in_words = False  # the head has judged words of it (not Whisper's guesses)
        self._cut_in_text = ""  # ... the last of them
        self._claimed = False  # ... and they are an opener that claims the floor ("Actually...")
        self._claim_until: float | None = None  # ... which ended: the voice stays held until then for its words
        self._ended_cut_in: tuple[np.ndarray, float] | None = None  # a cut-in that ended while judged
        self._listen_cache = PrefixCache()  # the heads' own KV cache: the reply's may be generating
        self._warming = False  # a warm-up of that cache is queued (see _warm_judge)
        self._transcriber = None  # a StreamingTranscriber, made in the model thread when first needed
        self._decisions: list[str] = []
        self.state = State.LISTENING
        self.history: list[dict] = []
        self.cache = PrefixCache()  # touched only in the model worker thread
        self.turns = 0

    async def warm_up(self) -> None:
        """Start from the system prompt already prefilled (the engine's copy), so
        that the first turn pays only for its own words."""
        def seed() -> None:
            # In place: a turn's adapter may already hold this cache object; one that
            # was already fed (a turn began first) has prefilled the prompt itself.
            if not self.cache.ids:
                self.engine.system_prefix(self.system_prompt, into=self.cache)

        await asyncio.get_running_loop().run_in_executor(self.engine.model_executor, seed)

    def say(self, text: str) -> None:
        """Speak ``text`` now, without a user turn (an opening line, a greeting).

        It plays like any reply: it can be cut off, and the history records what
        was heard as the assistant's turn. Ignored while a reply is in flight or the user is speaking.
        """
        self._speak(text)

    def _speak(self, text: str, resumes: str | None = None) -> None:
        if self._reply is not None or self._turn is not None:
            return
        loop = asyncio.get_running_loop()
        reply = Reply(user_end=self.now, audio=np.zeros(0, np.float32), generated=text.strip(), resumes=resumes)
        reply.t_asr_done = time.monotonic()
        reply.decoder = SpeechDecoder(self.engine.tts, self.engine.tts_executor, loop,
                                      on_audio=lambda a, t: self._on_audio(reply, a, t),
                                      on_group=lambda g: self.emit(AgentText(self.now, g)),
                                      ahead=lambda: self._outbox.samples / SAMPLE_RATE)
        self._reply = reply
        self._set_state(State.THINKING)
        reply.decoder.feed(text)
        reply.decoder.end()

        async def finish() -> None:
            await reply.decoder.done
            reply.synth_done = True
            if not reply.decoder.spoken_text and reply is self._reply:
                self._finish_reply(reply, interrupted=False)

        task = loop.create_task(finish(), name="duplex-say")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the tick ---------------------------------------------------------------------------------

    def step(self, audio: np.ndarray) -> np.ndarray:
        """Consume user audio (float32, 16 kHz) for [now, now + n); return the agent's
        n samples for the next n. n is a whole number of 20 ms frames within one chunk."""
        n, chunk = len(audio), self.config.chunk_samples
        if not n or n % FRAME_SAMPLES or self._in_chunk + n > chunk:
            raise ValueError(f"expected 20 ms frames ({FRAME_SAMPLES} samples each) up to the chunk's end "
                             f"({chunk - self._in_chunk} samples), got {n}")
        self._step_n = n
        t0 = self.now
        for i in range(0, n, FRAME_SAMPLES):
            t = t0 + i / SAMPLE_RATE
            frame = audio[i:i + FRAME_SAMPLES]
            self._recent.append((t, frame))
            if self._utterance is not None:
                self._utterance.append(frame)
                self._add_level(frame)
            if self._turn is not None:
                self._turn.frames.append(frame)
            for ev in self._endpointer.process(frame, t):
                self._on_vad(ev)
        self._in_chunk += n
        self._tick_energy[0] += float(np.sum(np.square(audio)))
        chunk_end = self._in_chunk == chunk
        if self.state is State.SPEAKING:
            self._cut_in_step()  # the user's voice over the agent is held, judged and let go by the step
        elif chunk_end:
            self._decide(ahead=self._words_just_ended(n, ahead=True))  # listening: decisions at each chunk's end
        elif self._words_just_ended(n):
            self._listen()  # ... and once the user falls silent: the end step need not wait for it
        elif self._words_just_ended(n, ahead=True):
            self._listen(ahead=True)  # ... which is taken a frame ahead, to be adopted if that frame is silent
        else:
            self._reconsider()  # ... and, between chunks, the verdict as the silence grows
        self.now = t0 + n / SAMPLE_RATE
        out = self._play(n)
        self._tick_energy[1] += float(np.sum(np.square(out)))
        if chunk_end:
            c0 = self.now - chunk / SAMPLE_RATE
            user_rms, agent_rms = (float(np.sqrt(e / chunk)) for e in self._tick_energy)
            self.timeline.add(TickRecord(round(c0 / (chunk / SAMPLE_RATE)), round(c0, 4), round(user_rms, 5),
                                         round(agent_rms, 5), self.state.value, ",".join(self._decisions),
                                         self._text_in_flight()))
            self._decisions, self._in_chunk, self._tick_energy = [], 0, [0.0, 0.0]
        return out

    @property
    def idle(self) -> bool:
        """Nothing in flight: no user turn open, no reply, no audio queued."""
        return (self._reply is None and self._utterance is None and self._turn is None and not self._held
                and self._outbox.samples == 0)

    # -- user side ---------------------------------------------------------------------------------

    def _on_vad(self, ev: VadEvent) -> None:
        if ev.kind == "start":
            self.emit(UserSpeechStart(ev.t))
            self._user_onset = ev.t
            self._cut_in_id += 1
            self._judged_reject, self._judge_after_ms, self._ended_cut_in = False, 0, None
            self._judged_voiced_ms, self._yielded, self._cut_in_words, self._cut_in_text = 0, False, False, ""
            self._claimed, self._claim_until = False, None
            self._utterance = [f for t, f in self._recent if t >= ev.t - PRE_ROLL_S]
            self._levels.clear()
            for f in self._utterance:
                self._add_level(f)
            # While speaking, the voice holds from the next step out (_cut_in_step),
            # unless it is somebody else. Before the reply plays, the user was not
            # done: drop it and keep listening to the whole turn.
            if self.state is not State.SPEAKING and self._reply is not None and not self._distant():
                self._drop_reply(rejoin=True)
            return
        self.emit(UserSpeechEnd(ev.t))
        frames, self._utterance = self._utterance or [], None
        if self.state is State.SPEAKING and self._judging:
            self._ended_cut_in = (np.concatenate(frames), ev.t)  # the verdict decides what it was
            return
        if self.state is State.SPEAKING:
            if self._claimed and self._holding:
                self._claim_until = ev.t + CLAIM_WAIT_S  # "Actually," and a breath: the words come
            elif self._yielding:
                # Too short to be a barge-in, or judged not meant for the agent: it goes on.
                self._release("reject", "short speech while the agent speaks")
            return
        if self.config.streaming:
            # No head: the endpointer's silence ends the turn. Nor does the head judge
            # a turn with no words heard yet (a cough, a cut-in that proves a hum): it
            # ends here too, not at max_pause_ms, and the last step's transcript settles
            # it (a reply it cut off goes on 1.1 s sooner).
            if self._turn is not None and (self.engine.head is None or not self._turn.text):
                self._decide_as("endpoint")
                self._end_turn(self._turn)
            return
        reply = self._reply
        audio = np.concatenate(self._held + frames)
        self._held = []
        if reply is not None and not reply.confirmed:
            reply.confirmed = True  # the speculative reply stands: the silence was the turn's end
            reply.user_end = ev.t
            self._decide_as("endpoint")
            self._set_state(State.THINKING)
            return
        self._decide_as("endpoint")
        self._start_reply(audio, ev.t, confirmed=True)

    def _decide(self, ahead: bool = False) -> None:
        """End of a chunk while the agent is silent: the turn heard (``ahead``: see
        ``_listen``), or (without streaming) a speculative start during a pause."""
        ep = self._endpointer
        if self.config.streaming:
            self._listen(ahead)
            return
        speculating = self._reply is not None and not self._reply.confirmed
        if speculating and ep.in_speech and ep.silence_ms == 0:
            self._drop_reply(rejoin=False)  # the user went on after the pause; the turn's audio is still open
            self.stats.speculative_dropped += 1
            self._decide_as("resume")
        elif (self._reply is None and ep.in_speech and self.config.speculate_ms
              and ep.silence_ms >= self.config.speculate_ms):
            # The turn's audio stays open (held + utterance): this reply may yet be dropped.
            audio = np.concatenate(self._held + (self._utterance or []))
            self._decide_as("speculate")
            self._start_reply(audio, ep.last_voiced_end, confirmed=False)

    def _decide_as(self, decision: str, probs: dict | None = None) -> None:
        self._decisions.append(decision)
        self.emit(Decision(self.now, decision, self.state.value, probs))

    # -- judging a cut-in while the agent speaks (the state head) ---------------------------------

    def _cut_in_step(self) -> None:
        """Each step while the agent speaks: hold, judge, give way or go on."""
        ep = self._endpointer
        if self._utterance is None:
            self._before_cut_in()  # (one that ended was settled in _on_vad or by its verdict)
            return
        voiced = ep.voiced_ms_in_turn
        if self.engine.head is None:
            if voiced >= self.config.barge_in_ms:
                self._interrupt()
            return
        if self._distant():
            if self._yielding:
                self._release("reject", "quieter than the user's voice: not addressed to the agent")
                self._yielded = False  # if it grows louder after a pause ("Stop, ... what"), it holds again
            return
        if not (self._yielded or self._judged_reject) and not (
                self.config.cut_in == "hold" and self._distant(
                    EARLY_LEVEL_FRAMES, onset_levels_db(np.concatenate(self._utterance[-2 * LEVEL_FRAMES:])))):
            self._yield_voice()  # loud enough to be the user, by a first guess
        held_ms = (self.now - self._hold_t) * 1000 if self._holding else 0.0
        if ep.silence_ms == 0 and not self._judged_reject and (
                held_ms >= self.config.hold_max_ms or self._cut_in_words and voiced >= self.config.hold_max_ms):
            # Talking on (over a held voice, or in words over a speaking one), never
            # rejected: the floor is theirs.
            self._interrupt()
            return
        if ep.silence_ms >= CUT_IN_PAUSE_MS:
            # A pause in the cut-in. A verdict on the way decides. Voice not judged yet
            # is judged, and held for if it may be words: after words, or if nothing of
            # it was judged and it is long enough for one (a piper "Wait," of 0.22 s let
            # go at its pause was talked over until its verdict, interrupt, came 0.1 s
            # on; an "okay" that Whisper only guessed at is let go: held, two missed the
            # backchannel's 0.8 s). Else (a short sound, no new words, no claim): speak on.
            if self._judging:
                return
            unjudged = voiced > self._judged_voiced_ms
            if self._holding and not self._claimed and not (unjudged and (
                    self._cut_in_words or self._judged_voiced_ms == 0 and voiced >= PAUSE_JUDGE_MS)):
                why = "words and a pause, not a claim on the floor: the voice goes on" if self._cut_in_words else ""
                self._release("release", why, text=self._cut_in_text)
            if unjudged:
                self._judge_cut_in()
            return
        if self._judging:
            return
        if (ep.silence_ms >= END_STEP_MS and (self._cut_in_words or self._judged_voiced_ms)
                and voiced > self._judged_voiced_ms):
            # Its words just stopped: judge them whole now, not at the pause (a backchannel
            # "I see" held the voice for 0.8 s: 0.2 s of pause, then a judgment). So too
            # after a guess on its first syllables: "I see" first heard as "Eyes..." was
            # judged at its end, the voice held for 1.0 s (WebRTC, 2026-11-29).
            self._judge_cut_in()
        elif voiced >= max(self.config.cut_in_judge_ms, self._judge_after_ms):
            self._judge_cut_in()

    def _before_cut_in(self) -> None:
        """A step with no cut-in open: an opener waiting for its words, or the first
        voiced frames of one. From HOLD_ONSET_FRAMES of them on, before the
        endpointer opens the cut-in (5), the voice holds unless they are clearly
        somebody else's; if they do not become speech, it goes on."""
        ep = self._endpointer
        if self._claim_until is not None:
            if self.now >= self._claim_until and self._holding:
                self._release("release", "an opener, and no words after it")
        elif self._holding:
            if not self._judging and self._ended_cut_in is None and ep.onset_frames < HOLD_ONSET_FRAMES:
                self._release("release", "")
        elif (self.engine.head is not None and self.config.cut_in == "hold"
              and ep.onset_frames >= HOLD_ONSET_FRAMES):
            onset = [f for _, f in list(self._recent)[-2 * HOLD_ONSET_FRAMES:]]
            if not self._distant(HOLD_ONSET_FRAMES, onset_levels_db(np.concatenate(onset))):
                self._yield_voice()

    @property
    def _yielding(self) -> bool:
        """The voice is held or ducked for a cut-in."""
        return self._holding or self._gain_target != 1.0

    def _yield_voice(self) -> None:
        """The user may be cutting in: hold the voice (or duck it) until it is judged."""
        self._yielded = True
        if self.config.cut_in == "hold":
            if not self._holding:  # (held already, on its first frames or for an opener: the fade has gone out)
                self._holding, self._hold_faded = True, False
                self._hold_t = self.now + self._step_n / SAMPLE_RATE  # refined when the fade goes out
            self._decide_as("hold")
        else:
            self._gain_target = DUCK_GAIN
            self._decide_as("duck")

    def _release(self, decision: str, why: str, probs: dict | None = None, text: str = "") -> None:
        """The cut-in was not for the agent: its voice goes on from where it held."""
        self._claim_until = None
        if self._holding:
            self._holding = False
            self._gain = 0.0  # ramps back up from silence
        self._gain_target = 1.0
        self._decide_as(decision, probs)
        if why:
            self.emit(TranscriptRejected(self.now, text, why))

    def _add_level(self, frame: np.ndarray) -> None:
        self._levels.extend(frame_levels_db(frame))

    def _distant(self, min_frames: int = LEVEL_FRAMES, levels=None) -> bool:
        """The current activation is well below the user's voice: somebody else.

        Levels are those of ``speech_level_db`` (the loud part of the speech, not
        its gaps); the user's voice is the median over the last turns answered. No
        turn answered yet, or under LEVEL_FRAMES to go by (a soft first syllable is
        not a quiet speaker): nobody is distant. With
        ``min_frames`` fewer, a first guess: quiet so far, by EARLY_MARGIN_DB more
        (of ``levels``, those frames', if given)."""
        levels = self._levels if levels is None else levels
        if not self.config.distant_db or not self._voice_levels:
            return False
        guess = min_frames < LEVEL_FRAMES
        if len(levels) < min_frames:
            return guess  # a guess waits for its frames; the full rule gives the benefit of doubt
        level = speech_level_db(levels)
        margin = self.config.distant_db + (EARLY_MARGIN_DB if guess else 0.0)
        return level < float(np.median(self._voice_levels)) - margin

    def _note_voice_level(self, audio: np.ndarray) -> None:
        db = frame_levels_db(audio)
        if len(db) >= 5:
            self._voice_levels.append(speech_level_db(db))

    def _warm_judge(self, reply: Reply) -> None:
        """Put the cut-in judge's prompt up to the user's words into its cache while
        the agent speaks (in the model thread's fast lane: between two tokens of
        the reply, which is generated faster than it is spoken), so that a
        judgment of a cut-in computes only its words. Called as
        each group has played; one warm-up waits at a time, and reads the groups
        played when it runs."""
        if self.engine.head is None or self._warming:
            return
        from agent.heads import chunk_hidden

        def warm() -> None:
            self._warming = False
            if reply is self._reply and not reply.cancel.is_set():
                # Before the first group has played, the one playing stands in for it.
                said = reply.played_groups or (reply.decoder.spoken_text[:1] if reply.decoder else [])
                t0, before = time.perf_counter(), len(self._listen_cache.ids)
                chunk_hidden(self.engine.llm, self._listen_cache, messages, "", " ".join(said) or None,
                             fast=self.config.cut_in_int8)
                log.debug("cut-in judge warmed: %d tokens in the cache before, %d now, %.0f ms",
                          before, len(self._listen_cache.ids), (time.perf_counter() - t0) * 1000)

        messages = self._conversation(reply)
        self._warming = True
        job = asyncio.wrap_future(self.engine.model_worker.run_urgent(warm))
        self._tasks.add(job)
        job.add_done_callback(self._tasks.discard)

    def _conversation(self, reply: Reply | None = None) -> list[dict]:
        """The system prompt and the history; with ``reply``, also the user turn it
        answers (not in the history until it is over). The cut-in judge's prompt
        needs it before the agent's words: the heads were trained on a user turn
        and then the reply being spoken, and the reply's prompt begins so."""
        messages = [{"role": "system", "content": self.system_prompt}] + self.history
        if reply is not None and reply.user_text:
            messages.append({"role": "user", "content": reply.user_text})
        return messages

    def _judge_cut_in(self) -> None:
        """Ask the state head whether the user's speech over the agent is meant to
        take the floor (interrupt), is a backchannel or side talk (reject), or is
        too early to tell (continue). Runs in the model thread's fast lane."""
        ep, reply = self._endpointer, self._reply
        self._judging = True
        self._judged_voiced_ms = ep.voiced_ms_in_turn
        cut_in = self._cut_in_id
        messages = self._conversation(reply)
        timing = Timing(ep.silence_ms, ep.voiced_ms_in_turn, True)
        # The agent's side: the groups played whole. The word being spoken changes
        # every chunk, and with it the LLM's prompt from that point on.
        heard = " ".join(reply.played_groups) if reply else ""
        job = self.engine.model_worker.run_urgent(self._judge_job, np.concatenate(self._utterance or []),
                                                  messages, heard, timing, time.perf_counter())
        asyncio.wrap_future(job).add_done_callback(lambda f: self._on_verdict(cut_in, f, ep.voiced_ms_in_turn))

    def _judge_job(self, audio: np.ndarray, messages: list[dict], heard: str, timing,
                   asked: float) -> tuple[str, dict | None, str]:
        """Model thread: the words of the cut-in so far, then the head's verdict on
        them. Logs where its time went (``asked``: when it was submitted)."""
        from agent.llm import common_prefix

        started, before = time.perf_counter(), self._listen_cache.ids
        heard_at = [started]  # when Whisper was done
        try:
            return self._judge(audio, messages, heard, timing, heard_at)
        finally:
            done, ids = time.perf_counter(), self._listen_cache.ids
            log.debug("cut-in judge: waited %.0f ms, Whisper %.0f ms, head %.0f ms (%d tokens)",
                      (started - asked) * 1000, (heard_at[-1] - started) * 1000, (done - heard_at[-1]) * 1000,
                      len(ids) - common_prefix(before, ids) if ids is not before else 0)

    def _judge(self, audio: np.ndarray, messages: list[dict], heard: str, timing,
               heard_at: list[float]) -> tuple[str, dict | None, str]:
        from agent.heads import chunk_hidden
        from speech_encoder.streaming import StreamingOptions, StreamingTranscriber

        if self._transcriber is None:
            self._transcriber = StreamingTranscriber.from_asr(self.engine.asr, StreamingOptions(pad_silence=False),
                                                              model_name=self.config.asr_model)
        heard_words = self._transcriber.transcribe_scored(audio, prompt=CUT_IN_PROMPT)
        heard_at.append(time.perf_counter())
        text = heard_words.text
        if is_hallucination(Transcript(text, 0.0, 0.0, "")):
            return "reject", None, text
        if hum(text):
            return "hum", None, text
        if heard_words.avg_logprob < CUT_IN_MIN_LOGPROB and not STOP_WORDS.match(text):
            # Whisper is guessing (a hum, a cough, the first syllable of a word):
            # no verdict on guesses; listen to more of it.
            return "continue", None, text
        # The agent's voice is held until this verdict comes: the cut-in's few
        # words go through the int8 copies unless told not to (cut_in_int8).
        hidden = chunk_hidden(self.engine.llm, self._listen_cache, messages, text, heard or None,
                              fast=self.config.cut_in_int8)
        verdict = self.engine.head.decide(hidden, timing)
        return verdict.label, verdict.by_label(), text

    def _on_verdict(self, cut_in: int, job: asyncio.Future, voiced_ms: int) -> None:
        self._judging = False
        if job.cancelled():
            return
        if job.exception():
            log.error("state head failed; the duration rule decides", exc_info=job.exception())
            label, probs, text = "interrupt", None, ""
        else:
            label, probs, text = job.result()
        ended, self._ended_cut_in = self._ended_cut_in, None
        ep = self._endpointer
        paused = not ep.in_speech or ep.silence_ms >= CUT_IN_PAUSE_MS
        stopped = not ep.in_speech or ep.silence_ms >= END_STEP_MS
        state = "ended" if ended else "paused" if paused else "stopped" if stopped else "going on"
        log.debug("cut-in judged at %.2f s (%s): %r -> %s %s", self.now, state, text, label, probs)
        if cut_in != self._cut_in_id or self.state is not State.SPEAKING or self._reply is None:
            return  # a newer cut-in, or the agent has already stopped
        label, claims = read_verdict(label, probs, text, ended=ended is not None, paused=paused, stopped=stopped,
                                     distant=self._distant(), voiced_ms=self._judged_voiced_ms)
        if claims:
            # The voice stays held (until the words come, or CLAIM_WAIT_S after the
            # opener); two of 28 cut-ins over WebRTC that opened so were talked over
            # for 1.5-2.1 s. Let go on a first syllable heard as a hum ("Uh-" for
            # "Actually", 2026-11-28), it holds again: the floor is being claimed.
            self._claimed = True
            if not self._yielding:
                self._yield_voice()
            if ended is not None:
                self._claim_until = ended[1] + CLAIM_WAIT_S
        if label == "interrupt":
            self._interrupt(probs)
            if ended is not None:  # the cut-in is over: answer it now
                self._decide_as("endpoint")
                if self.config.streaming:
                    self._end_turn(self._open_turn([ended[0]]), user_end=ended[1])
                else:
                    self._start_reply(np.concatenate(self._held + [ended[0]]), ended[1], confirmed=True)
                    self._held = []
            return
        self._cut_in_words = self._cut_in_words or probs is not None or claims
        if probs is not None or claims:
            self._cut_in_text = text
        # Judged again as it grows, whatever the verdict: a reject on its first
        # syllables ("W-s") must not decide what the whole cut-in was.
        self._judged_reject = label == "reject"
        self._judge_after_ms = voiced_ms + self.config.chunk_ms
        if label == "hum" and ended is None and not paused:
            self._release("hum", "a hum: the voice goes on", text=text)  # and the cut-in is still judged
        elif label == "reject" and ended is None and not paused and voiced_ms < REJECT_RELEASE_MS:
            self._decide_as(label, probs)  # a syllable or two: too little to give the floor back on
        elif label in ("reject", "hum") or (ended is not None or paused) and not claims:
            # Not for the agent, or over (or paused) without claiming the floor: go on.
            self._release(label, f"state head: {label} while the agent speaks", probs, text)
        else:
            self._decide_as(label, probs)

    # -- streaming: the user's turn heard chunk by chunk (agent/turn.py) -------------------------------

    def _heard_until(self) -> float:
        """Media time just after the last frame received."""
        return self._recent[-1][0] + FRAME_SAMPLES / SAMPLE_RATE if self._recent else self.now

    def _listen(self, ahead: bool = False) -> None:
        """End of a chunk while the agent is silent: open the user's turn when
        speech starts, hand the chunk's audio to the model thread, and end the
        turn on a long pause (the head's verdicts end it sooner: ``_on_heard``).
        ``ahead``: and let the transcriber take its end step a frame ahead."""
        ep, reply = self._endpointer, self._reply
        if self.state is State.SPEAKING:
            return
        voiced = ep.voiced_ms_in_turn
        if reply is not None:
            if (reply.turn is None or not ep.in_speech
                    or ep.voiced_ms_in_turn - reply.turn.voiced_mark < self.config.speech_start_ms):
                return
            # The user went on after the turn was judged over: it was not. The
            # reply is dropped and its audio rejoins the turn, which goes on.
            self._drop_reply(rejoin=True)
            self._decide_as("resume")
        turn = self._turn
        if turn is not None and self._turn_onset == self._cut_in_id and self._utterance is not None and self._distant():
            # The speech that opened the turn proved to be well below the user's voice.
            self._turn = None
            self._decide_as("reject")
            self.emit(TranscriptRejected(self.now, turn.text, "quieter than the user's voice: not addressed to the agent"))
            return
        if turn is None:
            if self._held:
                # A reply dropped because the user went on: their turn goes on now,
                # voiced at this frame or not. Reopened on voice only, it was lost
                # when the words stopped first (the two-agent simulation: "...
                # You know Lisbon." dropped, then silence, and neither agent spoke).
                frames = self._held + [f for t, f in self._recent if t >= self._held_until]
            elif not (ep.in_speech and ep.silence_ms == 0 and self._utterance is not None):
                return
            elif self._distant():
                return  # somebody else (a TV, a conversation in the room): no turn
            else:
                frames = list(self._utterance)
            turn = self._open_turn(frames)
        else:
            # The endpointer's count restarts with each stretch of speech.
            turn.speech_ms += voiced - turn.voiced_mark if voiced >= turn.voiced_mark else voiced
        turn.voiced_mark = voiced
        turn.in_flight += 1
        job = self.engine.model_worker.run_urgent(turn.listen, self.engine, self.cache, turn.take_new(), ahead)
        asyncio.wrap_future(job).add_done_callback(lambda f: self._on_heard(turn, f))
        if self.engine.head is not None and self._silence_ms() >= self.config.max_pause_ms:
            self._decide_as("timeout")
            self._end_turn(turn)

    def _words_just_ended(self, n: int, ahead: bool = False) -> bool:
        """Streaming, the agent silent: the user's silence reached the transcriber's
        end step (its decode that sees the words to their end) within these n samples.
        That step and the head's verdict on it run now, not at the chunk's end
        (up to a chunk sooner). ``ahead``: the silence reached one VAD frame less."""
        ep, turn = self._endpointer, self._turn
        if not (self.config.streaming and turn is not None and self._reply is None and ep.in_speech):
            return False
        at = END_STEP_MS - (VAD_FRAME_MS if ahead else 0)
        return at <= ep.silence_ms < at + n * 1000 // SAMPLE_RATE

    def _silence_ms(self) -> int:
        """Silence since the user's last voiced frame, including after the endpointer closed."""
        ep = self._endpointer
        if ep.in_speech and ep.silence_ms == 0:
            return 0
        return max(0, round((self._heard_until() - ep.last_voiced_end) * 1000))

    def _open_turn(self, frames: list[np.ndarray]) -> UserTurn:
        self._turn_count += 1
        messages = self._conversation()
        turn = UserTurn(self._turn_count, messages, frames=list(frames), opened_at=self.now,
                        speech_ms=self._endpointer.voiced_ms_in_turn, voiced_mark=self._endpointer.voiced_ms_in_turn)
        self._held = []
        self._turn = turn
        self._turn_onset = self._cut_in_id
        return turn

    def _on_heard(self, turn: UserTurn, job: asyncio.Future) -> None:
        """A chunk came back from the model thread: new words, perhaps, and the
        head's verdict on them with the timing as it is now."""
        turn.in_flight -= 1
        if job.cancelled():
            return
        if job.exception():
            log.error("listening failed; the pause will end the turn", exc_info=job.exception())
            return
        heard = job.result()
        hyp = heard.hypothesis
        log.debug("heard at %.2f s: %r | %r, step %.0f ms, prefill %d tok %.0f ms", self.now, hyp.committed,
                  hyp.tentative, hyp.compute_ms, heard.prefill.tokens, heard.prefill.ms)
        if turn is not self._turn:
            return  # ended or dropped meanwhile
        turn.seen_end = heard.seen_end
        if heard.hidden is not None:
            turn.hidden = heard.hidden
        if hyp.text != turn.text:
            turn.text = hyp.text
            self.emit(PartialTranscript(self.now, hyp.committed, hyp.tentative))
        silence = self._silence_ms()
        verdict = turn.decide(self.engine.head, Timing(silence, turn.speech_ms, False))
        if verdict is None:
            return
        label, probs = verdict
        if label == "reject" and len(turn.text.split()) > LISTEN_REJECT_MAX_WORDS:
            label = "continue"
        self._decide_as(label, probs)
        if not self._settled(turn, silence):
            return
        if label == "interrupt":
            self._end_turn(turn)
        elif label == "reject":
            self._turn = None  # not meant for the agent; speech that goes on opens a new turn
            self.emit(TranscriptRejected(self.now, turn.text, "state head: reject"))
            self._resume_cut_off()

    def _settled(self, turn: UserTurn, silence: int) -> bool:
        """A verdict on ``turn`` may be acted on: its words were heard to their end
        (the user is silent, and no audio the transcriber has not seen could change them)."""
        return silence > 0 and not turn.in_flight and turn.seen_end

    def _reconsider(self) -> None:
        """A frame between chunk ends, the agent silent: the head's verdict on the
        words heard, with the silence as long as it is now. The silence is one of
        the head's inputs, and a turn it was unsure had ended when the words came
        in often becomes one a few frames on; read at chunk ends only, that waited
        up to a chunk. The words are not recomputed: the head alone is asked (an
        MLP, well under a millisecond). Only interrupt is acted on (and recorded):
        a reject read on every frame would have 8 chances a chunk to catch a
        passing dip, and a turn rejected is a user ignored; rejects keep the
        chunk ends."""
        turn = self._turn
        if turn is None or self._reply is not None:
            return
        silence = self._silence_ms()
        if not self._settled(turn, silence):
            return
        verdict = turn.decide(self.engine.head, Timing(silence, turn.speech_ms, False))
        if verdict is not None and verdict[0] == "interrupt":
            self._decide_as(*verdict)
            self._end_turn(turn)

    def _end_turn(self, turn: UserTurn, user_end: float | None = None) -> None:
        """The user's turn is over: reply to it."""
        self._turn = None
        turn.voiced_mark = self._endpointer.voiced_ms_in_turn
        end = self._endpointer.last_voiced_end if user_end is None else user_end
        self._start_reply(turn.audio, end, confirmed=True, turn=turn, rest=turn.take_new())

    # -- the reply -------------------------------------------------------------------------------

    def _start_reply(self, audio: np.ndarray, user_end: float, confirmed: bool, turn: UserTurn | None = None,
                     rest: np.ndarray | None = None) -> None:
        reply = Reply(user_end=user_end, audio=audio, confirmed=confirmed, turn=turn, rest=rest,
                      heard_until=self._heard_until(),
                      open_utterance=self._cut_in_id if self._utterance is not None else None)
        self._reply = reply
        if confirmed:
            self._set_state(State.THINKING)
        task = asyncio.get_running_loop().create_task(self._respond(reply), name="duplex-reply")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respond(self, reply: Reply) -> None:
        try:
            await self._run_reply(reply)
        except Exception:
            log.exception("reply failed; the session goes back to listening")
            if reply is self._reply:
                self._stop(reply)
                self._finish_reply(reply, interrupted=reply.agent_start is not None)

    async def _run_reply(self, reply: Reply) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        t0 = time.monotonic()
        messages = self._conversation()
        if reply.turn is not None:
            # Streaming: the words are in; the transcriber's last step and the
            # prompt's last tokens are all that is left.
            final = await loop.run_in_executor(engine.model_executor, reply.turn.final, engine, self.cache,
                                               reply.rest)
            transcript = Transcript(final.text, final.no_speech_prob, 0.0, "")
            messages = list(reply.turn.messages)
            reply.prefill_tokens = final.prefill.tokens
        else:
            transcript = await loop.run_in_executor(engine.model_executor, engine.asr.transcribe, reply.audio)
        reply.asr_ms = (time.monotonic() - t0) * 1000
        reply.t_asr_done = time.monotonic()
        if reply.cancel.is_set():
            return
        if is_hallucination(transcript):
            if reply.confirmed:
                self.emit(TranscriptRejected(self.now, transcript.text, "no speech"))
            if self._cut_off is not None:
                self.stats.false_stops += 1
            self._finish_reply(reply, interrupted=False)
            self._resume_cut_off()
            return
        self._cut_off = None  # the cut-in had words: it is answered, not talked over
        self._note_voice_level(reply.audio)  # words answered: this is the user's voice
        reply.user_text = transcript.text
        self.emit(TranscriptEvent(self.now, transcript.text, transcript.no_speech_prob))
        messages = messages + [{"role": "user", "content": transcript.text}]
        reply.decoder = SpeechDecoder(engine.tts, engine.tts_executor, loop,
                                      on_audio=lambda a, t: self._on_audio(reply, a, t),
                                      on_group=lambda g: self.emit(AgentText(self.now, g)),
                                      ahead=lambda: self._outbox.samples / SAMPLE_RATE,
                                      say_again=self.config.say_again)
        try:
            await loop.run_in_executor(engine.model_executor, self._generate, reply, messages)
        finally:
            reply.decoder.end()
        if reply.decoder.said_instead:
            log.info("reply %r holds no words: said %r instead", reply.generated, reply.decoder.said_instead)
            reply.generated = reply.decoder.said_instead  # what the user heard is what the history keeps
        await reply.decoder.done
        reply.synth_done = True
        if not reply.decoder.spoken_text and not reply.cancel.is_set():
            self._finish_reply(reply, interrupted=False)  # the model said nothing speakable

    def _generate(self, reply: Reply, messages: list[dict]) -> None:
        """Model worker thread: prefill the prompt, then stream tokens into the decoder."""
        llm = self.engine.llm
        t0 = time.monotonic()
        reply.prefill_tokens += llm.extend(self.cache, llm.prompt_ids(messages))
        # The cut-in judge's prompt begins as this one does: from a copy, its
        # warm-up as the voice starts computes the words played, not the whole
        # conversation again in the reply's way (on a 2-core AVX2 EPYC the first
        # two groups of a reply came 1.4-4.2 s apart behind that prefill).
        self.cache.copy(into=self._listen_cache)
        pieces = []
        def alone() -> bool:  # the voice waits for its first group: nothing else to compute
            return not reply.decoder.spoken_text

        for piece in llm.generate(self.cache, self.config.max_new_tokens, reply.cancel, self.config.temperature,
                                  alone=alone):
            if not pieces:
                reply.llm_first_token_ms = (time.monotonic() - t0) * 1000
            pieces.append(piece)
            reply.decoder.feed(piece)
            if reply.decoder.said_instead:
                break  # a wordless reply was replaced: the rest of it would not be heard
            self.engine.model_worker.yield_point()  # listening work must not wait for the whole reply
            self._await_first_group(reply.decoder)
        reply.generated = "".join(pieces).strip()

    def _await_first_group(self, decoder: SpeechDecoder) -> None:
        """Model thread: while the reply's first group is synthesized (the audio
        everyone waits for; the voice may take every core for it), the next
        tokens wait: they are not needed before that group has played. Urgent
        listening work still runs."""
        if not decoder.spoken_text or decoder.first_done.is_set():
            return
        deadline = time.monotonic() + FIRST_GROUP_WAIT_S
        while not decoder.first_done.wait(0.02) and time.monotonic() < deadline:
            self.engine.model_worker.yield_point()

    def _on_audio(self, reply: Reply, audio: np.ndarray, text: str) -> None:
        if reply is not self._reply or reply.cancel.is_set():
            return
        if reply.first_audio_ms == 0.0 and len(audio):
            reply.first_audio_ms = (time.monotonic() - reply.t_asr_done) * 1000
        reply.pending_samples += len(audio)
        if text:
            reply.group_samples.append(reply.pending_samples)
            reply.pending_samples = 0
        self._outbox.put(audio, text)

    # -- agent side --------------------------------------------------------------------------------

    def _play(self, n: int) -> np.ndarray:
        """The agent chunk for media time [now, now + n): audio if ready, else silence."""
        reply = self._reply
        if reply is None or not reply.confirmed:
            out = np.zeros(n, np.float32)
            if self._tail is not None:
                out[:len(self._tail)], self._tail = self._tail, None
            return out
        if self._holding:
            # Held: silence, and the reply stays where it was. The first held chunk
            # carries a 10 ms fade of what comes next (no click); it plays again on release.
            out = np.zeros(n, np.float32)
            if not self._hold_faded:
                fade = self._outbox.peek(RAMP_SAMPLES)
                out[:len(fade)] = fade * np.linspace(self._gain, 0.0, RAMP_SAMPLES, endpoint=False,
                                                     dtype=np.float32)[:len(fade)]
                self._hold_faded = True
                self._hold_t = min(self._agent_audio_end, self.now + n / SAMPLE_RATE) + len(fade) / SAMPLE_RATE
            return out
        if reply.agent_start is None and self._waits_for_more(reply):
            return np.zeros(n, np.float32)
        out, real, groups, tail = self._outbox.pop(n)
        if groups:
            reply.played_groups.extend(groups)
            reply.played_in_group = tail
            self._warm_judge(reply)
        else:
            reply.played_in_group += real
        if real:
            if reply.agent_start is None:
                reply.agent_start = self.now
                self._set_state(State.SPEAKING)
                self.emit(AgentSpeechStart(self.now))
                self._warm_judge(reply)
            self._agent_audio_end = self.now + real / SAMPLE_RATE
        if reply.agent_start is not None and real < n and not reply.synth_done:
            reply.underruns += 1  # the voice fell behind mid-reply: a gap the user hears
            self.stats.underruns += 1
        self._apply_gain(out)
        if reply.synth_done and self._outbox.samples == 0 and reply.agent_start is not None:
            self._finish_reply(reply, interrupted=False)
        return out

    def _apply_gain(self, out: np.ndarray) -> None:
        if self._gain == self._gain_target == 1.0:
            return
        ramp = min(len(out), RAMP_SAMPLES)
        out[:ramp] *= np.linspace(self._gain, self._gain_target, ramp, endpoint=False, dtype=np.float32)
        out[ramp:] *= self._gain_target
        self._gain = self._gain_target

    def _interrupt(self, probs: dict | None = None) -> None:
        reply = self._reply
        if self._holding and self._hold_faded:
            stop_t = self._hold_t  # the voice has been silent since it held
            self._stop(reply)
        else:
            # The chunk sent last tick is playing until the end of this one; the next
            # one carries only a short fade to silence (no click), then nothing.
            fade, real, _, _ = self._outbox.pop(RAMP_SAMPLES)
            fade *= np.linspace(self._gain, 0.0, RAMP_SAMPLES, endpoint=False, dtype=np.float32)
            self._stop(reply)
            self._tail = fade[:real]
            stop_t = min(self._agent_audio_end, self.now + self._step_n / SAMPLE_RATE)  # what was handed out plays
            stop_t += real / SAMPLE_RATE
        self.stats.interruptions += 1
        self.stats.stop_latencies.append(stop_t - self._user_onset)
        spoken = reply.decoder.spoken_text if reply.decoder else []
        self._cut_off = (" ".join(reply.played_groups), " ".join(spoken[len(reply.played_groups):]))
        self._decide_as("interrupt", probs)
        self.emit(AgentSpeechEnd(stop_t, "interrupted"))
        self.emit(StateChanged(self.now, "interrupted"))
        self._finish_reply(reply, interrupted=True, stop_latency=stop_t - self._user_onset)
        if self.config.streaming and self._utterance is not None:
            self._open_turn(self._utterance)  # the cut-in so far is the start of the user's turn

    def _resume_cut_off(self) -> None:
        """The cut-in that stopped the last reply held no words after all (a cough
        heard as a word, a backchannel judged late): say the rest of that reply, from
        the group it cut, as a person picks up after "sorry, go on". Only the text
        already generated is said (the LLM was stopped with the voice)."""
        cut_off, self._cut_off = self._cut_off, None
        if cut_off and cut_off[1] and self._turn is None and self._utterance is None:
            self._decide_as("carry_on")
            self._speak(cut_off[1], resumes=cut_off[0])

    def _stop(self, reply: Reply) -> None:
        """Cancellation flows one way: LLM and voice stop, queued audio is dropped."""
        reply.cancel.set()
        if reply.decoder:
            reply.decoder.cancel()
        self._outbox.clear()
        self._gain = self._gain_target = 1.0
        self._holding, self._claim_until = False, None

    def _waits_for_more(self, reply: Reply) -> bool:
        """An answer to a statement waits until the user has been silent
        ``statement_gap_ms``: after "I have a job interview on Thursday." a listener
        leaves room for more (over WebRTC, 7 of 30 long turns with pauses heard the
        agent start in a pause of 0.5-1 s once it answered in about 1 s; 2026-11-28).
        A question or a request is answered as soon as the reply is ready, and
        the VAD has closed the words it answers: a reply ready sooner (here a
        wordless one, replaced at once) would meet the user's own last words,
        still open, as a cut-in over it, and hold, then stop for them."""
        if (reply.open_utterance == self._cut_in_id and self._utterance is not None
                and self._endpointer.silence_ms > 0):
            return True  # closed within endpoint_silence_ms; voice again is a cut-in, as before
        gap = self.config.statement_gap_ms
        text = reply.user_text.strip()
        if not gap or reply.turn is None or not text or asks(text):
            return False
        return self._silence_ms() < gap

    def _drop_reply(self, rejoin: bool) -> None:
        """Forget a reply the user talked over before it played; with ``rejoin``
        its audio goes back in front of the user's (still open) turn."""
        reply = self._reply
        self._stop(reply)
        if rejoin:
            self._held, self._held_until = [reply.audio], reply.heard_until
        self._reply = None
        self._set_state(State.LISTENING)

    def heard_text(self, reply: Reply) -> str:
        """The words of the reply the user actually heard: whole groups played,
        plus the played share of the group cut off (by its sample count), marked
        cut with a dash. (Marked "...", Qwen answered a cut-in Whisper misheard
        with that fragment again, "London is a...", in 2 of 27 bench cut-ins;
        marked " -", and unmarked, it answered in a whole sentence.)"""
        heard = list(reply.played_groups)
        spoken = reply.decoder.spoken_text if reply.decoder else []
        idx = len(heard)
        if idx < len(spoken) and reply.played_in_group:
            total = reply.group_samples[idx] if idx < len(reply.group_samples) else reply.pending_samples
            words = spoken[idx].split()
            # Words take time in proportion to their letters, near enough.
            share = min(1.0, reply.played_in_group / max(total, 1))
            budget, kept = share * sum(len(w) + 1 for w in words), []
            for w in words:
                budget -= len(w) + 1
                if budget < 0:
                    break
                kept.append(w)
            if kept:
                heard.append(" ".join(kept) + " -")
        return " ".join(heard)

    def _text_in_flight(self) -> str:
        reply = self._reply
        if reply is None or reply.decoder is None:
            return ""
        spoken, idx = reply.decoder.spoken_text, len(reply.played_groups)
        return spoken[idx] if idx < len(spoken) else ""

    def _finish_reply(self, reply: Reply, interrupted: bool, stop_latency: float | None = None) -> None:
        if reply is not self._reply:
            return
        self._reply = None
        self._holding = False
        self._set_state(State.LISTENING)
        if reply.agent_start is None:
            return  # nothing was said (rejected transcript, or an empty reply)
        if not interrupted:
            self.emit(AgentSpeechEnd(self._agent_audio_end, "finished"))
        heard = reply.generated if not interrupted and reply.generated else self.heard_text(reply)
        if reply.resumes is not None and self.history and self.history[-1]["role"] == "assistant":
            # One answer, said in two parts (the cut group said again): one turn in the history.
            self.history[-1] = {"role": "assistant", "content": f"{reply.resumes} {heard}".strip()}
            return
        if reply.user_text:
            self.history.append({"role": "user", "content": reply.user_text})
        self.history.append({"role": "assistant", "content": heard})
        self.history = self.history[-2 * self.config.max_history_turns:]
        if not reply.user_text:
            return  # a line said on the agent's own initiative answers no user turn
        self.turns += 1
        self.emit(Turn(self.now, self.turns, reply.user_text, heard, reply.user_end, reply.agent_start,
                       reply.agent_start - reply.user_end, interrupted, reply.asr_ms,
                       reply.llm_first_token_ms, reply.first_audio_ms, reply.prefill_tokens,
                       stop_latency, reply.underruns))

    # -- plumbing ----------------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self.emit(StateChanged(self.now, state.value))

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self._on_event:
            self._on_event(event)

    def metrics(self) -> dict:
        s = self.stats
        return {"underruns": s.underruns, "interruptions": s.interruptions, "false_stops": s.false_stops,
                "speculative_dropped": s.speculative_dropped,
                "stop_latencies_s": [round(x, 4) for x in s.stop_latencies]}

    async def close(self) -> None:
        """Stop any reply and wait for its workers to finish (no work left running)."""
        if self._reply:
            self._stop(self._reply)
            self._reply = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

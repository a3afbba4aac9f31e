"""One conversation: its state machine, history and output, driven chunk by chunk.

A transport calls ``step(user_chunk)`` once per clock tick with the user's audio
for media time [now, now + chunk) and gets back exactly one agent chunk, to be
played over the next tick. ``step`` only does bookkeeping: endpointing, and
starting or cancelling a reply. The reply itself (Whisper, the LLM, the voice)
runs in the engine's worker threads and drops its audio into the outbox; a tick
takes whatever audio is ready and plays silence otherwise.

States: listening -> (user turn ends) thinking -> (first audio plays) speaking
-> (audio ends) listening. User speech during thinking means the user was not
done: the reply is dropped and the utterance goes on. Sustained user speech
during speaking is a barge-in: the reply stops, and the history keeps only the
words the user heard.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from agent.config import SAMPLE_RATE
from agent.engine import Engine
from agent.events import (AgentSpeechEnd, AgentSpeechStart, AgentText, Event, StateChanged, TranscriptEvent,
                          TranscriptRejected, Turn, UserSpeechEnd, UserSpeechStart)
from agent.llm import PrefixCache
from speech_decoder.decoder import SpeechDecoder
from speech_encoder.asr import is_hallucination
from speech_encoder.vad import FRAME_SAMPLES, Endpointer, VadEvent

log = logging.getLogger(__name__)
PRE_ROLL_S = 0.2  # audio kept from before the detected onset, so Whisper hears it


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

    def pop(self, n: int) -> tuple[np.ndarray, int, list[str]]:
        """Up to n samples (zero-padded to n); returns (chunk, real samples, groups completed)."""
        out = np.zeros(n, np.float32)
        filled, done = 0, []
        while self._pieces and filled < n:
            audio, text = self._pieces[0]
            take = min(n - filled, len(audio))
            out[filled:filled + take] = audio[:take]
            filled += take
            if take == len(audio):
                self._pieces.popleft()
                if text:
                    done.append(text)
            else:
                self._pieces[0] = (audio[take:], text)
        self.samples -= filled
        return out, filled, done

    def clear(self) -> None:
        self._pieces.clear()
        self.samples = 0


@dataclass
class Reply:
    """The agent's answer to one user turn, from transcription to last sample."""

    user_end: float
    audio: np.ndarray  # the user's turn, kept so a dropped reply's audio can rejoin it
    cancel: threading.Event = field(default_factory=threading.Event)
    decoder: SpeechDecoder | None = None
    user_text: str = ""
    generated: str = ""
    played_groups: list[str] = field(default_factory=list)
    played_in_group: int = 0  # samples of the current (unfinished) group already played
    agent_start: float | None = None
    synth_done: bool = False
    asr_ms: float = 0.0
    llm_first_token_ms: float = 0.0
    first_audio_ms: float = 0.0
    prefill_tokens: int = 0
    t_asr_done: float = 0.0


class Session:
    def __init__(self, engine: Engine, on_event: Callable[[Event], None] | None = None):
        self.engine = engine
        self.config = cfg = engine.config
        self.now = 0.0  # media time at the start of the next user chunk, s
        self.events: list[Event] = []
        self._on_event = on_event
        self._endpointer = Endpointer(cfg.vad_aggressiveness, cfg.speech_start_ms, cfg.endpoint_silence_ms)
        self._recent: deque[tuple[float, np.ndarray]] = deque(maxlen=int(0.5 * SAMPLE_RATE / FRAME_SAMPLES))
        self._utterance: list[np.ndarray] | None = None  # frames of the user turn in progress
        self._held: list[np.ndarray] = []  # an ended turn whose reply was dropped: the user went on
        self._outbox = Outbox()
        self._reply: Reply | None = None
        self._tasks: set[asyncio.Task] = set()
        self._agent_audio_end = 0.0
        self.state = State.LISTENING
        self.history: list[dict] = []
        self.cache = PrefixCache()  # touched only in the model worker thread
        self.turns = 0

    async def warm_up(self) -> None:
        """Prefill the system prompt before the user speaks, so that the first
        turn pays only for its own words."""
        llm = self.engine.llm
        ids = llm.prompt_ids([{"role": "system", "content": self.config.system_prompt}])
        await asyncio.get_running_loop().run_in_executor(self.engine.model_executor, llm.extend, self.cache, ids)

    # -- the tick ---------------------------------------------------------------------------------

    def step(self, chunk: np.ndarray) -> np.ndarray:
        """Consume one user chunk (float32, 16 kHz); return one agent chunk of the same length."""
        n = self.config.chunk_samples
        if len(chunk) != n:
            raise ValueError(f"expected a chunk of {n} samples, got {len(chunk)}")
        for i in range(0, n, FRAME_SAMPLES):
            t = self.now + i / SAMPLE_RATE
            frame = chunk[i:i + FRAME_SAMPLES]
            self._recent.append((t, frame))
            if self._utterance is not None:
                self._utterance.append(frame)
            for ev in self._endpointer.process(frame, t):
                self._on_vad(ev)
            if self._barge_in_due():
                self._interrupt()
        self.now += n / SAMPLE_RATE
        return self._play(n)

    @property
    def idle(self) -> bool:
        """Nothing in flight: no user turn open, no reply, no audio queued."""
        return self._reply is None and self._utterance is None and not self._held and self._outbox.samples == 0

    # -- user side ---------------------------------------------------------------------------------

    def _on_vad(self, ev: VadEvent) -> None:
        if ev.kind == "start":
            self.emit(UserSpeechStart(ev.t))
            self._utterance = [f for t, f in self._recent if t >= ev.t - PRE_ROLL_S]
            if self.state is State.THINKING:
                # The user was not done: drop the reply and keep listening to the whole turn.
                self._drop_reply()
            return
        self.emit(UserSpeechEnd(ev.t))
        frames, self._utterance = self._utterance or [], None
        if self.state is State.SPEAKING:
            # Too short to be a barge-in (a backchannel, a cough): the agent goes on.
            self.emit(TranscriptRejected(self.now, "", "short speech while the agent speaks"))
            return
        audio = np.concatenate(self._held + frames)
        self._held = []
        self._start_reply(audio, ev.t)

    def _barge_in_due(self) -> bool:
        return (self.state is State.SPEAKING and self._endpointer.in_speech
                and self._endpointer.voiced_ms_in_turn >= self.config.barge_in_ms)

    # -- the reply -------------------------------------------------------------------------------

    def _start_reply(self, audio: np.ndarray, user_end: float) -> None:
        reply = Reply(user_end=user_end, audio=audio)
        self._reply = reply
        self._set_state(State.THINKING)
        task = asyncio.get_running_loop().create_task(self._respond(reply), name="duplex-reply")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)

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
        transcript = await loop.run_in_executor(engine.model_executor, engine.asr.transcribe, reply.audio)
        reply.asr_ms = (time.monotonic() - t0) * 1000
        reply.t_asr_done = time.monotonic()
        if reply.cancel.is_set():
            return
        if is_hallucination(transcript):
            self.emit(TranscriptRejected(self.now, transcript.text, "no speech"))
            self._finish_reply(reply, interrupted=False)
            return
        reply.user_text = transcript.text
        self.emit(TranscriptEvent(self.now, transcript.text, transcript.no_speech_prob))
        messages = ([{"role": "system", "content": self.config.system_prompt}] + self.history
                    + [{"role": "user", "content": transcript.text}])
        reply.decoder = SpeechDecoder(engine.tts, engine.tts_executor, loop,
                                      on_audio=lambda a, t: self._on_audio(reply, a, t),
                                      on_group=lambda g: self.emit(AgentText(self.now, g)))
        try:
            await loop.run_in_executor(engine.model_executor, self._generate, reply, messages)
        finally:
            reply.decoder.end()
        await reply.decoder.done
        reply.synth_done = True
        if not reply.decoder.spoken_text and not reply.cancel.is_set():
            self._finish_reply(reply, interrupted=False)  # the model said nothing speakable

    def _generate(self, reply: Reply, messages: list[dict]) -> None:
        """Model worker thread: prefill the prompt, then stream tokens into the decoder."""
        llm = self.engine.llm
        t0 = time.monotonic()
        reply.prefill_tokens = llm.extend(self.cache, llm.prompt_ids(messages))
        pieces = []
        for piece in llm.generate(self.cache, self.config.max_new_tokens, reply.cancel, self.config.temperature):
            if not pieces:
                reply.llm_first_token_ms = (time.monotonic() - t0) * 1000
            pieces.append(piece)
            reply.decoder.feed(piece)
        reply.generated = "".join(pieces).strip()

    def _on_audio(self, reply: Reply, audio: np.ndarray, text: str) -> None:
        if reply is not self._reply or reply.cancel.is_set():
            return
        if reply.first_audio_ms == 0.0 and len(audio):
            reply.first_audio_ms = (time.monotonic() - reply.t_asr_done) * 1000
        self._outbox.put(audio, text)

    # -- agent side --------------------------------------------------------------------------------

    def _play(self, n: int) -> np.ndarray:
        """The agent chunk for media time [now, now + n): audio if ready, else silence."""
        out, real, groups = self._outbox.pop(n)
        reply = self._reply
        if reply is None:
            return out
        if groups:
            reply.played_groups.extend(groups)
            reply.played_in_group = 0
        reply.played_in_group += real if not groups else 0
        if real:
            if reply.agent_start is None:
                reply.agent_start = self.now
                self._set_state(State.SPEAKING)
                self.emit(AgentSpeechStart(self.now))
            self._agent_audio_end = self.now + real / SAMPLE_RATE
        if reply.synth_done and self._outbox.samples == 0 and reply.agent_start is not None:
            self._finish_reply(reply, interrupted=False)
        return out

    def _interrupt(self) -> None:
        reply = self._reply
        self._stop(reply)
        # The chunk sent on the last tick is playing now, until the end of this one.
        stop_t = min(self._agent_audio_end, self.now + self.config.chunk_samples / SAMPLE_RATE)
        self.emit(AgentSpeechEnd(stop_t, "interrupted"))
        self.emit(StateChanged(self.now, "interrupted"))
        self._finish_reply(reply, interrupted=True)

    def _stop(self, reply: Reply) -> None:
        """Cancellation flows one way: LLM and voice stop, queued audio is dropped."""
        reply.cancel.set()
        if reply.decoder:
            reply.decoder.cancel()
        self._outbox.clear()

    def _drop_reply(self) -> None:
        reply = self._reply
        self._stop(reply)
        self._held = [reply.audio]
        self._reply = None
        self._set_state(State.LISTENING)

    def heard_text(self, reply: Reply) -> str:
        """The words of the reply the user actually heard (whole groups, plus the
        played share of the group cut off, by sample count)."""
        heard = list(reply.played_groups)
        spoken = reply.decoder.spoken_text if reply.decoder else []
        if len(spoken) > len(heard) and reply.played_in_group:
            # Estimate the share of the cut group by an average speaking rate (~2.5 words/s).
            words = spoken[len(heard)].split()
            k = min(len(words), int(reply.played_in_group / SAMPLE_RATE * 2.5))
            if k:
                heard.append(" ".join(words[:k]) + "...")
        return " ".join(heard)

    def _finish_reply(self, reply: Reply, interrupted: bool) -> None:
        if reply is not self._reply:
            return
        self._reply = None
        self._set_state(State.LISTENING)
        if reply.agent_start is None:
            return  # nothing was said (rejected transcript, or an empty reply)
        if not interrupted:
            self.emit(AgentSpeechEnd(self._agent_audio_end, "finished"))
        heard = reply.generated if not interrupted and reply.generated else self.heard_text(reply)
        self.history += [{"role": "user", "content": reply.user_text},
                         {"role": "assistant", "content": heard}]
        self.history = self.history[-2 * self.config.max_history_turns:]
        self.turns += 1
        self.emit(Turn(self.now, self.turns, reply.user_text, heard, reply.user_end, reply.agent_start,
                       reply.agent_start - reply.user_end, interrupted, reply.asr_ms,
                       reply.llm_first_token_ms, reply.first_audio_ms, reply.prefill_tokens))

    # -- plumbing ----------------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self.emit(StateChanged(self.now, state.value))

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self._on_event:
            self._on_event(event)

    async def close(self) -> None:
        """Stop any reply and wait for its workers to finish (no work left running)."""
        if self._reply:
            self._stop(self._reply)
            self._reply = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

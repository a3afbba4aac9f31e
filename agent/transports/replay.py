"""Replay: recorded or scripted user audio is the microphone, paced in real time.

Block k of the user's audio (``io_ms`` long, a 20 ms frame by default; the
session decides once per chunk of several) covers media time [kF, (k+1)F); it is
handed to the session at wall time start + (k+1)F, the moment a live microphone
would have delivered it, and the agent block that ``step`` returns plays over
[(k+1)F, (k+2)F). Both tracks land on one timeline in ``conversation.wav``
(left: user, right: agent).

A ``UserScript`` makes the user react to the agent, as a person would: say this,
then cut in 2 s after the agent starts talking, or answer 0.5 s after it stops.
"""
from __future__ import annotations

import asyncio
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.clock import ChunkClock
from agent.config import SAMPLE_RATE
from agent.engine import Engine
from agent.events import AgentSpeechEnd, AgentSpeechStart, Event, Turn, write_jsonl
from agent.session import Session
from speech_encoder.audio import load_audio, write_wav


@dataclass(frozen=True)
class Utterance:
    """One thing the user says, and when: ``delay`` seconds after its trigger.

    trigger: "previous" (the end of the user's previous utterance, or the start
    of the run), "agent_start" (the agent's next start of speech) or "agent_end"
    (the agent's next end of speech).
    """

    audio: np.ndarray  # float32 mono 16 kHz
    delay: float = 0.0
    trigger: str = "previous"


class UserScript:
    """Feeds a session the user's chunks, starting each utterance on its trigger."""

    def __init__(self, utterances: list[Utterance]):
        for u in utterances:
            if u.trigger not in ("previous", "agent_start", "agent_end"):
                raise ValueError(f"unknown trigger {u.trigger!r}")
        self._todo = list(utterances)
        self._playing: np.ndarray | None = None
        self._armed_at = 0.0  # media time the current utterance began waiting for its trigger
        self.starts: list[float] = []  # media time each utterance started

    @property
    def speaking(self) -> bool:
        return self._playing is not None

    @property
    def done(self) -> bool:
        return not self._todo and self._playing is None

    def _due(self, events: list[Event]) -> float | None:
        u = self._todo[0]
        if u.trigger == "previous":
            return self._armed_at + u.delay
        kind = AgentSpeechStart if u.trigger == "agent_start" else AgentSpeechEnd
        hit = next((e.t for e in events if isinstance(e, kind) and e.t >= self._armed_at), None)
        return None if hit is None else hit + u.delay

    def chunk(self, n: int, t0: float, events: list[Event]) -> np.ndarray:
        """The user's audio for media time [t0, t0 + n / rate)."""
        out = np.zeros(n, np.float32)
        filled = 0
        while filled < n:
            if self._playing is None:
                if not self._todo:
                    break
                due = self._due(events)
                t = t0 + filled / SAMPLE_RATE
                if due is None or due >= t0 + n / SAMPLE_RATE:
                    break
                filled = max(filled, int(round((max(due, t) - t0) * SAMPLE_RATE)))
                self.starts.append(t0 + filled / SAMPLE_RATE)
                self._playing = self._todo.pop(0).audio
            take = min(n - filled, len(self._playing))
            out[filled:filled + take] = self._playing[:take]
            self._playing = self._playing[take:]
            filled += take
            if not len(self._playing):
                self._playing = None
                self._armed_at = t0 + filled / SAMPLE_RATE
        return out


@dataclass(frozen=True)
class ReplayOptions:
    tail_s: float = 1.0  # silence recorded after the agent has finished
    max_wait_s: float = 60.0  # give up this long after the script has ended
    max_duration_s: float = 900.0  # a hard cap on any run


async def run_script(engine: Engine, script: UserScript, out_dir: Path,
                     options: ReplayOptions = ReplayOptions()) -> dict:
    """Play ``script`` into a new session in real time; write the outputs to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = engine.config.io_samples
    tick = n / SAMPLE_RATE
    session = Session(engine)
    await session.warm_up()
    clock = ChunkClock(tick)
    user, agent = [], [np.zeros(n, np.float32)]  # the agent's block k plays one block later
    quiet, script_end = 0, None
    try:
        while clock.k * tick < options.max_duration_s:
            k = await clock.tick()
            chunk = script.chunk(n, k * tick, session.events)
            user.append(chunk)
            agent.append(session.step(chunk))
            quiet = quiet + 1 if session.idle and not script.speaking else 0
            if script.done:
                script_end = k * tick if script_end is None else script_end
                if quiet * tick >= options.tail_s or k * tick - script_end > options.max_wait_s:
                    break
            elif quiet * tick > options.max_wait_s:
                break  # the script waits for the agent, which has nothing more to say
    finally:
        await session.close()
    user_track = np.concatenate(user + [np.zeros(n, np.float32)])
    agent_track = np.concatenate(agent)
    write_stereo(out_dir / "conversation.wav", user_track, agent_track)
    write_session_logs(out_dir, session)
    summary = summarize(session, clock, len(user_track) / SAMPLE_RATE, script.starts)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


async def run_replay(engine: Engine, audio: np.ndarray, out_dir: Path,
                     options: ReplayOptions = ReplayOptions()) -> dict:
    """Play ``audio`` (float32 mono 16 kHz) into a new session from time 0."""
    return await run_script(engine, UserScript([Utterance(audio)]), out_dir, options)


def write_stereo(path: Path, left: np.ndarray, right: np.ndarray) -> None:
    """Two float32 16 kHz tracks on one timeline as a stereo WAV; the shorter is padded with silence."""
    n = max(len(left), len(right))
    tracks = [np.pad(x, (0, n - len(x))) for x in (left, right)]
    write_wav(path, np.stack(tracks, axis=1), SAMPLE_RATE)


def write_session_logs(out_dir: Path, session: Session, suffix: str = "") -> None:
    """``events{suffix}.jsonl`` (in media-time order) and ``timeline{suffix}.jsonl`` of one session."""
    write_jsonl(out_dir / f"events{suffix}.jsonl", sorted(session.events, key=lambda e: e.t))
    session.timeline.write(out_dir / f"timeline{suffix}.jsonl")


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def summarize(session: Session, clock: ChunkClock, duration_s: float, user_starts: list[float]) -> dict:
    turns = [e.to_dict() for e in session.events if isinstance(e, Turn)]
    answered = [t["latency"] for t in turns]
    return {
        "duration_s": round(duration_s, 3),
        "chunk_ms": session.config.chunk_ms,
        "io_ms": session.config.io_ms,
        "user_utterance_starts": [round(t, 3) for t in user_starts],
        "turns": turns,
        "median_latency_s": _median(answered),
        "median_stop_latency_s": _median(session.stats.stop_latencies),
        "tick_lag_ms": clock.jitter_ms(),
        **session.metrics(),
    }


def replay_file(engine: Engine, input_path: Path, out_dir: Path, options: ReplayOptions = ReplayOptions()) -> dict:
    """Blocking entry point for the CLI: any WAV (rate, channels) in, outputs in ``out_dir``."""
    audio = load_audio(input_path, SAMPLE_RATE)
    return asyncio.run(run_replay(engine, audio, out_dir, options))

"""Replay: a WAV file is the user's microphone, paced in real time.

Chunk k of the file covers media time [kT, (k+1)T); it is handed to the session
at wall time start + (k+1)T, the moment a live microphone would have delivered
it, and the agent chunk that ``step`` returns plays over [(k+1)T, (k+2)T). Both
tracks land on one timeline in ``conversation.wav`` (left: user, right: agent).
"""
from __future__ import annotations

import asyncio
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.config import SAMPLE_RATE
from agent.engine import Engine
from agent.events import Turn, write_jsonl
from agent.session import Session
from speech_encoder.audio import load_audio, write_wav


@dataclass(frozen=True)
class ReplayOptions:
    tail_s: float = 1.0  # silence recorded after the agent has finished
    max_wait_s: float = 60.0  # give up waiting for the agent this long after the input ends


async def run_replay(engine: Engine, audio: np.ndarray, out_dir: Path,
                     options: ReplayOptions = ReplayOptions()) -> dict:
    """Play ``audio`` (float32 mono 16 kHz) into a new session; write the three outputs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = engine.config.chunk_samples
    tick = n / SAMPLE_RATE
    session = Session(engine)
    await session.warm_up()
    loop = asyncio.get_running_loop()
    user, agent = [], [np.zeros(n, np.float32)]  # the agent's chunk k plays one tick later
    lags: list[float] = []
    start = loop.time()
    k, quiet_ticks, input_ticks = 0, 0, -(-len(audio) // n)
    try:
        while True:
            due = start + (k + 1) * tick
            await asyncio.sleep(max(0.0, due - loop.time()))
            lags.append(loop.time() - due)
            chunk = np.zeros(n, np.float32)
            piece = audio[k * n:(k + 1) * n]
            chunk[:len(piece)] = piece
            user.append(chunk)
            agent.append(session.step(chunk))
            k += 1
            if k >= input_ticks:
                quiet_ticks = quiet_ticks + 1 if session.idle else 0
                if quiet_ticks * tick >= options.tail_s or (k - input_ticks) * tick > options.max_wait_s:
                    break
    finally:
        await session.close()
    user_track = np.concatenate(user + [np.zeros(n, np.float32)])
    agent_track = np.concatenate(agent)
    write_wav(out_dir / "conversation.wav", np.stack([user_track, agent_track], axis=1), SAMPLE_RATE)
    events = sorted(session.events, key=lambda e: e.t)
    write_jsonl(out_dir / "events.jsonl", events)
    summary = summarize(session, lags, len(user_track) / SAMPLE_RATE, engine.config.chunk_ms)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(session: Session, lags: list[float], duration_s: float, chunk_ms: int) -> dict:
    turns = [e.to_dict() for e in session.events if isinstance(e, Turn)]
    latencies = [t["latency"] for t in turns]
    lag_ms = sorted(x * 1000 for x in lags)
    return {
        "duration_s": round(duration_s, 3),
        "chunk_ms": chunk_ms,
        "turns": turns,
        "median_latency_s": round(statistics.median(latencies), 4) if latencies else None,
        "tick_lag_ms": {"p50": round(lag_ms[len(lag_ms) // 2], 2), "p99": round(lag_ms[int(len(lag_ms) * 0.99)], 2),
                        "max": round(lag_ms[-1], 2)} if lag_ms else None,
    }


def replay_file(engine: Engine, input_path: Path, out_dir: Path, options: ReplayOptions = ReplayOptions()) -> dict:
    """Blocking entry point for the CLI: any WAV (rate, channels) in, outputs in ``out_dir``."""
    audio = load_audio(input_path, SAMPLE_RATE)
    return asyncio.run(run_replay(engine, audio, out_dir, options))

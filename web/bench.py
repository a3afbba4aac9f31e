"""``bench webrtc``: latencies measured at a WebRTC client, over loopback.

Each round is one call from a scripted client (``web.client.RtcClient``):

1. response: the client asks a short question; response latency is the time
   from the last voiced sample of the question leaving the client to the first
   voiced frame of the agent's answer arriving back at it;
2. barge-in: the client asks for something long, lets the agent talk for
   ``talk_s``, then speaks over it; stop latency is the time from the onset of
   that speech leaving the client to the last voiced agent frame arriving
   (followed by silence).

Both include everything a user would live through: Opus, the network, the
chunk clock and the server's jitter allowance, not just the engine.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.config import SAMPLE_RATE
from speech_encoder.audio import load_audio
from web.client import VOICED_RMS, RtcClient

QUESTION = "What is the capital of France?"
LONG_QUESTION = "Please tell me a long story about a brave knight and a friendly dragon."
INTERRUPTION = "Wait, stop, stop. Let me ask something else."


def speak(text: str) -> np.ndarray:
    """Text -> float32 16 kHz speech with a Debian voice (flite, else espeak-ng)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        if shutil.which("flite"):
            subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(path)], check=True)
        elif shutil.which("espeak-ng"):
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
        else:
            raise RuntimeError("bench webrtc speaks with flite or espeak-ng: run scripts/system-deps.sh")
        return load_audio(path, SAMPLE_RATE)


def voiced_span(audio: np.ndarray, frame: int = 320) -> tuple[float, float]:
    """(onset, offset) in seconds of the voiced part of 16 kHz audio."""
    n = len(audio) // frame
    rms = np.sqrt(np.mean(np.square(audio[:n * frame].reshape(n, frame)), axis=1))
    voiced = np.flatnonzero(rms > VOICED_RMS)
    if not len(voiced):
        raise ValueError("the audio has no speech")
    return voiced[0] * frame / SAMPLE_RATE, (voiced[-1] + 1) * frame / SAMPLE_RATE


@dataclass(frozen=True)
class RoundResult:
    response_s: float | None  # at the client; None when no answer came
    server_latency_s: float | None  # the session's own Turn.latency (media time)
    stop_s: float | None  # barge-in stop latency at the client; None when there was no audio to cut


async def ask(client: RtcClient, question: np.ndarray, timeout: float = 60.0) -> tuple[float | None, float | None]:
    """Speak ``question``; wait for the turn; return (client latency, server latency)."""
    after = len(client.events)
    utt = client.say(question)
    speech_end = await utt.started + voiced_span(question)[1]
    turn = await client.wait_for(lambda e: e["type"] == "turn", timeout, after)
    first = client.heard.first_sound_after(speech_end)
    return (None if first is None else first - speech_end), turn["latency"]


async def barge_in(client: RtcClient, request: np.ndarray, interruption: np.ndarray, talk_s: float = 1.0,
                   timeout: float = 60.0) -> float | None:
    """Ask for a long answer, cut in after ``talk_s`` of it; return the stop latency at the client."""
    after = len(client.events)
    client.say(request)
    await client.wait_for(lambda e: e["type"] == "agent_speech_start", timeout, after)
    await asyncio.sleep(talk_s)  # the user listens this long, then speaks over the agent
    after = len(client.events)
    utt = client.say(interruption)
    onset = await utt.started + voiced_span(interruption)[0]
    try:
        await client.wait_for(lambda e: e["type"] == "state" and e["state"] == "interrupted", 10.0, after)
    except TimeoutError:
        return None  # the agent had finished before the user cut in
    await asyncio.sleep(1.0)  # let the last frames in flight arrive
    stop = client.heard.sound_stop_after(onset)
    return None if stop is None else stop - onset  # None: no agent audio reached the client after the onset


async def run_round(url: str, token: str | None, voices: dict[str, np.ndarray]) -> RoundResult:
    client = RtcClient(url, token)
    try:
        await client.connect()
        silence = np.zeros(SAMPLE_RATE // 2, np.float32)
        response, server = await ask(client, np.concatenate([silence, voices["question"]]))
        await asyncio.sleep(1.0)
        stop = await barge_in(client, voices["long"], voices["interruption"])
        return RoundResult(response, server, stop)
    finally:
        await client.close()


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs)
    return {"n": len(xs), "p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3)}


async def bench_webrtc(url: str, rounds: int, token: str | None = None) -> dict:
    voices = {"question": speak(QUESTION), "long": speak(LONG_QUESTION), "interruption": speak(INTERRUPTION)}
    results = []
    for i in range(rounds):
        r = await run_round(url, token, voices)
        results.append(r)
        fmt = lambda x: "-" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
        print(f"round {i + 1}/{rounds}: response {fmt(r.response_s)} (server {fmt(r.server_latency_s)}), "
              f"barge-in stop {fmt(r.stop_s)}", flush=True)
    return {
        "rounds": rounds,
        "response_latency_s": percentiles([r.response_s for r in results if r.response_s is not None]),
        "server_turn_latency_s": percentiles([r.server_latency_s for r in results if r.server_latency_s is not None]),
        "barge_in_stop_latency_s": percentiles([r.stop_s for r in results if r.stop_s is not None]),
        # Rounds where the cut-in found the agent already silent (its answer over, or between words).
        "barge_ins_not_measured": sum(r.stop_s is None for r in results),
    }

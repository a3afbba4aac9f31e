"""A scripted WebRTC caller: what a browser does, in Python, for tests and benchmarks.

``RtcClient`` makes an offer like the page does (one sendrecv Opus track and the
"events" data channel), posts it to ``/offer`` and then:

- ``say(audio)`` speaks 16 kHz audio into the call in real time (``ScriptedMic``
  sends silence between utterances, paced by start + pts / rate, as a
  microphone would) and tells when each utterance's samples went out;
- records the agent's audio as it arrives (16 kHz, with the arrival time of
  every 20 ms frame), so latencies are measured where a user would hear them;
- collects the session's events and lets a caller wait for one.
"""
from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from agent.config import SAMPLE_RATE
from speech_encoder.audio import resample
from web import jitter
from web.audio import FRAME_SAMPLES_48K, RTC_RATE, Decimator, frame_to_mono, mono_to_frames

VOICED_RMS = 0.01  # a 20 ms frame of the user's (flite) speech louder than this is voiced
AUDIBLE_RMS = 0.002  # -54 dBFS: the agent's audio is heard (also when ducked while the user cuts in)


class OfferRefused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class Utterance:
    audio48: np.ndarray
    started: asyncio.Future  # loop time its first sample went out
    ended: asyncio.Future  # loop time its last sample went out


class ScriptedMic(MediaStreamTrack):
    """A microphone that says what it is told, when it is told, and silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Utterance] = deque()
        self._offset = 0  # samples of the first queued utterance already sent
        self._start: float | None = None
        self._pts = 0

    def say(self, audio16: np.ndarray) -> Utterance:
        loop = asyncio.get_running_loop()
        utt = Utterance(resample(audio16.astype(np.float32), SAMPLE_RATE, RTC_RATE), loop.create_future(),
                        loop.create_future())
        self._queue.append(utt)
        return utt

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        wait = self._start + self._pts / RTC_RATE - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        at = self._start + self._pts / RTC_RATE  # when this frame is due: it goes out now
        out = np.zeros(FRAME_SAMPLES_48K, np.float32)
        filled = 0
        while self._queue and filled < len(out):
            utt = self._queue[0]
            if self._offset == 0 and not utt.started.done():
                utt.started.set_result(at + filled / RTC_RATE)
            take = min(len(out) - filled, len(utt.audio48) - self._offset)
            out[filled:filled + take] = utt.audio48[self._offset:self._offset + take]
            filled += take
            self._offset += take
            if self._offset == len(utt.audio48):
                utt.ended.set_result(at + filled / RTC_RATE)
                self._queue.popleft()
                self._offset = 0
        frame = mono_to_frames(out, self._pts)[0]
        frame.time_base = Fraction(1, RTC_RATE)
        self._pts += len(out)
        return frame


@dataclass
class AgentAudio:
    """The agent's audio as heard by the client: 16 kHz samples and per-frame arrival."""

    chunks: list[np.ndarray] = field(default_factory=list)
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # (loop time, rms) per frame

    def samples(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    def first_sound_after(self, t: float) -> float | None:
        return next((at for at, rms in self.arrivals if at >= t and rms > AUDIBLE_RMS), None)

    def sound_stop_after(self, t: float, gap_s: float = 0.5) -> float | None:
        """Arrival time of the last audible frame after ``t`` before ``gap_s`` of silence."""
        last = None
        for at, rms in self.arrivals:
            if at < t or rms <= AUDIBLE_RMS:
                continue
            if last is not None and at - last >= gap_s:
                break
            last = at
        return last


class RtcClient:
    def __init__(self, base_url: str, token: str | None = None, origin: str | None = None):
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self.origin = origin
        self.pc = RTCPeerConnection()
        self.mic = ScriptedMic()
        self.heard = AgentAudio()
        self.events: list[dict] = []
        self._waiters: list[tuple[Callable[[dict], bool], asyncio.Future]] = []
        self._listen_task: asyncio.Task | None = None
        self._channel = self.pc.createDataChannel("events")
        self._channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    async def connect(self, timeout: float = 30.0) -> dict:
        """Offer, get the answer, and wait for the session's hello; returns it."""
        self.pc.addTrack(self.mic)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await post_offer(self.base_url, self.pc.localDescription.sdp, self.token, self.origin)
        await self.pc.setRemoteDescription(RTCSessionDescription(**answer))
        return await self.wait_for(lambda e: e["type"] == "hello", timeout)

    async def close(self) -> None:
        if self._listen_task:
            self._listen_task.cancel()
            await asyncio.wait([self._listen_task], timeout=5)
        self.mic.stop()
        await asyncio.wait_for(self.pc.close(), 10)

    def say(self, audio16: np.ndarray) -> Utterance:
        return self.mic.say(audio16)

    async def wait_for(self, predicate: Callable[[dict], bool], timeout: float, after: int = 0) -> dict:
        """The first event (from index ``after`` on) that matches, waiting up to ``timeout`` s."""
        for e in self.events[after:]:
            if predicate(e):
                return e
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters = [(p, f) for p, f in self._waiters if f is not future]

    def _on_message(self, message) -> None:
        event = json.loads(message)
        event["arrived"] = asyncio.get_running_loop().time()
        self.events.append(event)
        for predicate, future in self._waiters:
            if not future.done() and predicate(event):
                future.set_result(event)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._listen_task is None:
            jitter.install(self.pc)  # frames as they arrive: the recording places them by arrival
            self._listen_task = asyncio.get_running_loop().create_task(self._listen(track), name="rtc-client-listen")

    async def _listen(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        decimate = Decimator()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            audio = decimate(frame_to_mono(frame))
            self.heard.chunks.append(audio)
            self.heard.arrivals.append((loop.time(), float(np.sqrt(np.mean(np.square(audio)))) if len(audio) else 0.0))


async def post_offer(base_url: str, sdp: str, token: str | None = None, origin: str | None = None) -> dict:
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if origin:
        headers["Origin"] = origin
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(base_url.rstrip("/") + "/offer", json={"sdp": sdp, "type": "offer"}, headers=headers)
    if r.status_code != 200:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise OfferRefused(r.status_code, detail)
    return r.json()

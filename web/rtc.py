"""One browser call: an aiortc peer connection wired to one ``Session``.

Three tasks, all owned by the ``Call`` and cancelled (with a timeout) when it
hangs up:

- ``listen``: pulls the browser's audio (``await track.recv()``, Opus decoded to
  48 kHz), converts it to 16 kHz and places it on the session's media timeline
  by its RTP timestamp (``agent.clock.InputBuffer``);
- ``tick``: the session's clock, one block F (``io_ms``, 20 ms) at a time. Tick
  k fires at start + (k+1)F, takes user block k (silence where nothing arrived
  in time), calls ``session.step`` and queues the returned agent block, which
  plays over [(k+1)F, (k+2)F) (the session decides once per chunk of blocks);
- ``warm-up``: prefills the system prompt on the model thread once connected.

``AgentTrack`` is the outgoing track: it paces its 20 ms frames by their media
time (origin + pts / rate), never by how fast the sender asks, so the agent's
audio leaves on the session's clock. Events of the session go to the browser as
JSON over the "events" data channel.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from agent.clock import InputBuffer
from agent.config import SAMPLE_RATE
from agent.engine import Engine
from agent.events import Event
from agent.session import Session
from web import jitter
from web.audio import RTC_RATE, Decimator, Interpolator, frame_to_mono, mono_to_frames

log = logging.getLogger(__name__)
TIME_BASE = Fraction(1, RTC_RATE)
EVENTS_LABEL = "events"  # the data channel the page opens
MAX_BUFFERED_BYTES = 256 * 1024  # events are dropped (counted) beyond this backlog on the data channel


@dataclass(frozen=True)
class CallOptions:
    connect_timeout_s: float = 20.0  # answer sent -> media flowing, else hang up
    media_timeout_s: float = 10.0  # no audio frame from the browser this long: it has gone
    # The user's audio is placed this much later than it arrived, against network jitter. On
    # loopback with the session busy, frames came up to 13 ms later than the first (2026-11-28).
    jitter_ms: int = 40
    close_timeout_s: float = 10.0  # the most a hang-up waits for any one of its parts


class AgentTrack(MediaStreamTrack):
    """The agent's voice: 20 ms s16 frames at 48 kHz, released at their media time."""

    kind = "audio"

    def __init__(self, max_frames: int = 100):
        super().__init__()
        self._frames: asyncio.Queue[AudioFrame] = asyncio.Queue(max_frames)
        self._origin: float | None = None  # loop time at which pts 0 plays
        self._pts = 0
        self.dropped_frames = 0  # the sender fell more than max_frames behind

    def start(self, origin: float) -> None:
        self._origin = origin

    def push(self, audio48: np.ndarray) -> None:
        for frame in mono_to_frames(audio48, self._pts):
            frame.time_base = TIME_BASE
            if self._frames.full():
                self._frames.get_nowait()
                self.dropped_frames += 1
            self._frames.put_nowait(frame)
        self._pts += len(audio48)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._frames.get()
        loop = asyncio.get_running_loop()
        wait = self._origin + frame.pts / RTC_RATE - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        return frame


class Call:
    """A peer connection and its session, from the answer to the hang-up."""

    _ids = itertools.count(1)

    def __init__(self, pc: RTCPeerConnection, engine: Engine, options: CallOptions,
                 on_closed: Callable[["Call"], None]):
        self.id = f"call-{next(self._ids)}"
        self.pc = pc
        self.options = options
        self.session = Session(engine, self._on_event)
        self.track = AgentTrack()
        # One block per step of the session; room for 5 s of audio that comes early.
        self.inbox = InputBuffer(engine.config.io_samples, SAMPLE_RATE, 5 * SAMPLE_RATE // engine.config.io_samples)
        self.hangup_reason = ""
        self.closed = asyncio.Event()
        self.dropped_events = 0
        self.late_ticks = 0  # steps that ran more than one block (io_ms) after their deadline
        self.reanchors = 0  # times the user's audio was moved on the timeline (see _place)
        self._on_closed = on_closed
        self._channel: RTCDataChannel | None = None
        self._remote: MediaStreamTrack | None = None  # the browser's microphone
        self._packets: list[jitter.InOrderAudioBuffer] = []
        self._connected = asyncio.Event()
        self._t0: float | None = None  # loop time of media time 0; set when the clock starts
        self._anchor: float | None = None  # media time of RTP pts 0 of the browser's audio
        self._decimate = Decimator()
        self._interpolate = Interpolator()
        self._tasks: dict[str, asyncio.Task] = {}
        self._close_task: asyncio.Task | None = None
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Called once the answer is sent: wait for the connection, then run the clock."""
        self._spawn("run", self._run())

    def _spawn(self, name: str, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"duplex-{self.id}-{name}")
        self._tasks[name] = task
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self.id, task.get_name(), exc_info=task.exception())
            self.hang_up("internal error")

    async def _run(self) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), self.options.connect_timeout_s)
        except TimeoutError:
            self.hang_up(f"no connection within {self.options.connect_timeout_s:g} s")
            return
        self._spawn("warm-up", self.session.warm_up())
        if self._remote is not None:
            self._spawn("listen", self._listen(self._remote))
        try:
            await self._tick()
        except Exception:
            log.exception("%s: the session failed", self.id)
            self.hang_up("internal error")

    def hang_up(self, reason: str) -> None:
        """Start closing (idempotent); safe to call from the call's own tasks."""
        if self._close_task is None:
            self.hangup_reason = reason
            self._close_task = asyncio.get_running_loop().create_task(self._close(), name=f"duplex-{self.id}-close")

    async def close(self, reason: str = "server closed the call") -> None:
        self.hang_up(reason)
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        log.info("%s: hanging up (%s)", self.id, self.hangup_reason)
        timeout = self.options.close_timeout_s
        self._send({"type": "hangup", "reason": self.hangup_reason})
        # Cancelling the warm-up drops its prefill if the model thread has not started
        # it; one already running ends on its own (a prefill cannot be interrupted).
        running = list(self._tasks.values())
        for task in running:
            task.cancel()
        if running:
            _, late = await asyncio.wait(running, timeout=timeout)
            if late:
                log.warning("%s: %d task(s) still running after %g s", self.id, len(late), timeout)
        try:
            await asyncio.wait_for(self.session.close(), timeout)
        except TimeoutError:
            log.warning("%s: the session's reply did not stop within %g s", self.id, timeout)
        self.track.stop()
        try:
            await asyncio.wait_for(self.pc.close(), timeout)
        except TimeoutError:
            log.warning("%s: the peer connection did not close within %g s", self.id, timeout)
        self._tasks.clear()
        log.info("%s: %s", self.id, self.stats())
        self._on_closed(self)
        self.closed.set()

    def stats(self) -> dict:
        """What went wrong with the media, counted (for the logs)."""
        return {"media_s": round(self.session.now, 2), "missing_chunks": self.inbox.missing_chunks,
                "late_samples": self.inbox.late_samples, "reanchors": self.reanchors, "late_ticks": self.late_ticks,
                "dropped_frames": self.track.dropped_frames, "dropped_events": self.dropped_events,
                "lost_packets": sum(b.lost for b in self._packets), "stale_packets": sum(b.stale for b in self._packets)}

    # -- peer connection events ------------------------------------------------------------------

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("%s: connection %s", self.id, state)
        if state == "connected":
            self._connected.set()
        elif state in ("failed", "closed"):
            self.hang_up(f"connection {state}")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._remote is None:
            self._remote = track  # listened to once connected
            # Packets straight on: the user's audio is placed by timestamp with our own allowance.
            self._packets = jitter.install(self.pc)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_LABEL:
            return
        self._channel = channel
        channel.on("message", self._on_message)
        if self._t0 is not None:
            self._hello()

    def _on_message(self, message) -> None:
        try:
            kind = json.loads(message).get("type") if isinstance(message, str) else None
        except (ValueError, AttributeError):
            kind = None
        if kind == "bye":
            self.hang_up("the user hung up")

    # -- the user's audio in ---------------------------------------------------------------------

    async def _listen(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await asyncio.wait_for(track.recv(), self.options.media_timeout_s)
            except MediaStreamError:
                self.hang_up("the browser's audio ended")
                return
            except TimeoutError:
                self.hang_up(f"no audio from the browser for {self.options.media_timeout_s:g} s")
                return
            samples = self._decimate(frame_to_mono(frame))
            if self._t0 is not None:
                self._place(frame, samples, loop.time() - self._t0)

    def _place(self, frame: AudioFrame, samples: np.ndarray, arrived: float) -> None:
        """Put a frame on the media timeline: the first frame fixes where RTP time 0
        lies (its arrival, minus its length, plus the jitter allowance); later frames
        follow their timestamps, so network jitter does not move the user's words.
        A frame that would land too late (the path got slower than the allowance) or
        more than a second early (the sender's clock jumped) moves the anchor."""
        start = float(frame.pts * frame.time_base)
        duration = frame.samples / frame.sample_rate
        t = None if self._anchor is None else self._anchor + start
        if t is None or t < self.inbox.open_from or t > arrived + 1.0:
            if t is not None:
                self.reanchors += 1
            self._anchor = arrived - duration + self.options.jitter_ms / 1000 - start
            t = self._anchor + start
        self.inbox.put(t, samples)

    # -- the clock -------------------------------------------------------------------------------

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        n = self.session.config.io_samples
        block_s = n / SAMPLE_RATE
        self._t0 = loop.time()
        self.track.start(self._t0 + block_s)  # agent block k plays over [(k+1)F, (k+2)F)
        if self._channel is not None:
            self._hello()
        for k in itertools.count():
            due = self._t0 + (k + 1) * block_s
            await asyncio.sleep(max(0.0, due - loop.time()))
            if loop.time() - due > block_s:
                self.late_ticks += 1
            agent = self.session.step(self.inbox.take(k))
            self.track.push(self._interpolate(agent))

    # -- events out ------------------------------------------------------------------------------

    def _hello(self) -> None:
        self._send({"type": "hello", "call": self.id, "chunk_ms": self.session.config.chunk_ms})
        self._send({"type": "state", "t": 0.0, "state": self.session.state.value})

    def _on_event(self, event: Event) -> None:
        self._send(event.to_dict())

    def _send(self, message: dict) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        if channel.bufferedAmount > MAX_BUFFERED_BYTES:
            self.dropped_events += 1
            return
        channel.send(json.dumps(message))

"""The computer's own microphone and speakers, through PortAudio (sounddevice).

    microphone -> input callback -> mic ring --(capture thread)--> resample to 16 kHz
        -> echo canceller (reference: exactly what the output callback played)
        -> one chunk of ``chunk_samples`` -> the event loop -> Session.step
    Session.step's agent chunk -> resample to the speaker's rate -> jitter buffer
        -> output callback -> speaker (and a copy into the reference ring)

The microphone is the clock: a tick happens when the capture has a whole chunk,
so the session runs at the sound card's pace and never drifts from it. The
device callbacks only copy into bounded rings; the output plays silence
(counted) when the jitter buffer runs dry. One thread (``duplex-capture``)
resamples and cancels echo; it is owned by ``LocalAudio`` and joined by
``close()``. A device that fails (unplugged, taken, no audio for
``stall_s``) ends the run with a ``DeviceError`` whose message says what
happened; no traceback reaches the user.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass
from math import ceil, gcd
from pathlib import Path
from typing import Callable

import numpy as np

from agent.clock import ChunkClock
from agent.config import SAMPLE_RATE
from agent.engine import Engine
from agent.events import Event
from agent.session import Session
from agent.transports.replay import summarize, write_session_logs, write_stereo

log = logging.getLogger(__name__)
MAX_CHANNELS = 2  # opened per device; input is averaged to mono, output is mono copied to each


class DeviceError(RuntimeError):
    """A sound device that cannot be used; the message is meant for the user."""


def _sounddevice():
    try:
        import sounddevice
    except OSError as e:  # the PortAudio library itself is missing
        raise DeviceError(f"PortAudio is not available ({e}); install it: apt-get install libportaudio2") from None
    return sounddevice


# -- devices ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    hostapi: str
    rate: int  # the device's default sample rate: the one it is opened at
    channels: int  # opened with this many (at most MAX_CHANNELS)


def list_devices() -> str:
    """A table of every device PortAudio sees; '>' marks the defaults."""
    sd = _sounddevice()
    devices = sd.query_devices()
    if not len(devices):
        return "no audio devices found (is a sound server running, or is there a sound card?)"
    apis = sd.query_hostapis()
    default_in, default_out = sd.default.device
    lines = [f"  {'#':>3}  {'name':40} {'host API':12} {'in':>3} {'out':>4} {'rate':>7}"]
    for d in devices:
        mark = ">" if d["index"] in (default_in, default_out) else " "
        lines.append(f"{mark} {d['index']:>3}  {d['name'][:40]:40} {apis[d['hostapi']]['name'][:12]:12} "
                     f"{d['max_input_channels']:>3} {d['max_output_channels']:>4} {int(d['default_samplerate']):>7}")
    return "\n".join(lines)


def pick_device(spec: str | int | None, kind: str) -> Device:
    """The device for ``kind`` ('input' or 'output'): the default when ``spec`` is None,
    else by index or by (a unique part of) its name."""
    sd = _sounddevice()
    key = f"max_{kind}_channels"
    devices = [d for d in sd.query_devices() if d[key] > 0]
    if spec is None:
        index = sd.default.device[0 if kind == "input" else 1]
        found = [d for d in devices if d["index"] == index] or devices[:1]
        if not found:
            what = "microphone" if kind == "input" else "speaker"
            raise DeviceError(f"no {what} found: PortAudio sees no {kind} device. Is a sound server "
                              "(PulseAudio, PipeWire) running, or a sound card present? See --list-devices")
    elif str(spec).isdigit():
        found = [d for d in devices if d["index"] == int(spec)]
        if not found:
            raise DeviceError(f"there is no {kind} device #{spec}; see --list-devices")
    else:
        found = ([d for d in devices if d["name"] == spec]
                 or [d for d in devices if str(spec).lower() in d["name"].lower()])
        if len(found) != 1:
            names = ", ".join(repr(d["name"]) for d in found) or "none"
            raise DeviceError(f"{kind} device {spec!r} matches {len(found)} devices ({names}); see --list-devices")
    d = found[0]
    return Device(d["index"], d["name"], sd.query_hostapis(d["hostapi"])["name"], int(d["default_samplerate"]),
                  min(d[key], MAX_CHANNELS))


# -- building blocks -------------------------------------------------------------------------------


class StreamResampler:
    """``resample_poly``'s filter applied chunk by chunk, its state kept between calls.

    The outputs, concatenated, equal resampling the whole signal at once (an
    output comes out as soon as the input it needs has arrived, about
    ``10 / min(src, dst)`` s later), whatever the chunk sizes.
    """

    def __init__(self, src_rate: int, dst_rate: int):
        g = gcd(src_rate, dst_rate)
        self.up, self.down = dst_rate // g, src_rate // g
        if self.up == self.down:
            return  # the same rate: process() passes audio through
        from scipy.signal import firwin  # here: importing this module stays cheap for the CLI parser

        max_rate = max(self.up, self.down)
        self._half = 10 * max_rate  # scipy's filter design, so that offline and streaming agree
        h = firwin(2 * self._half + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * self.up
        self._taps = ceil(len(h) / self.up)
        h = np.pad(h, (0, self._taps * self.up - len(h)))
        self._phases = h.reshape(self._taps, self.up).T.astype(np.float32)  # [phase, tap]
        self._buf = np.zeros(self._taps, np.float32)  # input history; _buf[0] has index _base
        self._base = -self._taps
        self._received = 0
        self._next = 0  # index of the next output sample

    def process(self, x: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return x.astype(np.float32)
        self._buf = np.concatenate([self._buf, x.astype(np.float32)])
        self._received += len(x)
        # Output m needs the input up to (m * down + half) // up.
        last = ((self._received - 1) * self.up - self._half) // self.down
        m = np.arange(self._next, max(self._next, last + 1))
        if len(m):
            n = m * self.down + self._half
            newest = n // self.up - self._base
            idx = newest[:, None] - np.arange(self._taps)[None, :]
            y = np.einsum("mt,mt->m", self._phases[n % self.up], self._buf[idx]).astype(np.float32)
            self._next = int(m[-1]) + 1
        else:
            y = np.zeros(0, np.float32)
        keep_from = (self._next * self.down + self._half) // self.up - self._taps + 1 - self._base
        if keep_from > 0:
            self._buf, self._base = self._buf[keep_from:], self._base + keep_from
        return y


class SampleRing:
    """A bounded FIFO of float32 samples shared by a device callback and one other thread.

    A write beyond ``capacity`` drops the oldest samples (counted in ``dropped``).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return self._size

    def write(self, x: np.ndarray) -> None:
        with self._lock:
            self._chunks.append(np.array(x, np.float32, copy=True).reshape(-1))
            self._size += len(x)
            excess = self._size - self.capacity
            while excess > 0:
                head = self._chunks[0]
                cut = min(excess, len(head))
                if cut == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[cut:]
                self._size -= cut
                self.dropped += cut
                excess -= cut

    def read_into(self, out: np.ndarray) -> int:
        """Fill ``out`` from the front; return how many samples it got (the rest untouched)."""
        n, got = len(out), 0
        with self._lock:
            while got < n and self._chunks:
                head = self._chunks[0]
                take = min(n - got, len(head))
                out[got:got + take] = head[:take]
                got += take
                if take == len(head):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = head[take:]
            self._size -= got
        return got

    def read_all(self) -> np.ndarray:
        out = np.empty(self._size, np.float32)
        return out[:self.read_into(out)]


@dataclass(frozen=True)
class CaptureChunk:
    """One tick of microphone audio, float32 16 kHz, ``chunk_samples`` long.

    ``clean`` is what the session hears (echo cancelled); ``raw`` the microphone
    before the canceller; ``far_rms`` the loudness of what the speaker played
    meanwhile. This is the hook for the state heads' residual-echo reject path:
    speech in ``clean`` while ``far_rms`` is high and ``clean`` is far below
    ``raw`` is likely the agent's own voice.
    """

    k: int
    clean: np.ndarray
    raw: np.ndarray
    far_rms: float


class _Chunker:
    """Cuts the aligned clean and raw microphone streams into ``CaptureChunk``s of n samples,
    each with the loudness of the far end received meanwhile."""

    def __init__(self, n: int):
        self.n = n
        self.k = 0
        self._clean = self._raw = np.zeros(0, np.float32)
        self._far_energy, self._far_count = 0.0, 0

    def far(self, x: np.ndarray) -> None:
        self._far_energy += float(np.sum(np.square(x)))
        self._far_count += len(x)

    def push(self, clean: np.ndarray, raw: np.ndarray) -> list[CaptureChunk]:
        self._clean, self._raw = np.concatenate([self._clean, clean]), np.concatenate([self._raw, raw])
        chunks = []
        while len(self._clean) >= self.n:  # the canceller's output lags the raw by under 10 ms
            far_rms = float(np.sqrt(self._far_energy / self._far_count)) if self._far_count else 0.0
            chunks.append(CaptureChunk(self.k, self._clean[:self.n], self._raw[:self.n], far_rms))
            self._clean, self._raw = self._clean[self.n:], self._raw[self.n:]
            self._far_energy, self._far_count, self.k = 0.0, 0, self.k + 1
        return chunks


# -- the two streams and the capture thread --------------------------------------------------------


@dataclass(frozen=True)
class AudioOptions:
    input_device: str | None = None  # index or part of the name; None: the system default
    output_device: str | None = None
    aec: bool = True  # cancel the speaker's echo (turn off for a headset)
    jitter_ms: int = 80  # played audio kept in hand beyond one chunk, against late ticks
    latency: str | float = "high"  # PortAudio's suggested device latency: 'low', 'high' or seconds; 'low'
    # glitches (PortAudio underflows) on a busy machine, and the jitter buffer cannot help with those
    stall_s: float = 2.0  # a microphone that delivers nothing this long has failed


class LocalAudio:
    """The microphone and speaker streams of one conversation, and its capture thread.

    ``start()`` opens both devices (``DeviceError`` if it cannot); then
    ``await next_chunk()`` gives one ``CaptureChunk`` per tick (None once a stop
    was requested; ``DeviceError`` when a device failed) and ``play(chunk)``
    queues the agent's 16 kHz chunk. ``close()`` is idempotent: streams closed,
    thread joined.
    """

    def __init__(self, chunk_samples: int, options: AudioOptions = AudioOptions()):
        self.options = options
        self.n = chunk_samples
        self.mic = pick_device(options.input_device, "input")
        self.speaker = pick_device(options.output_device, "output")
        out_chunk = ceil(chunk_samples * self.speaker.rate / SAMPLE_RATE)
        self._prime = out_chunk + self.speaker.rate * options.jitter_ms // 1000  # play once this much is in hand
        self._mic_ring = SampleRing(2 * self.mic.rate)
        self._out_ring = SampleRing(self._prime + 2 * out_chunk)  # beyond: the oldest is dropped (clock drift)
        self._played = SampleRing(2 * self.speaker.rate)  # the canceller's reference
        self._from_mic = StreamResampler(self.mic.rate, SAMPLE_RATE)
        self._to_speaker = StreamResampler(SAMPLE_RATE, self.speaker.rate)
        self._from_played = StreamResampler(self.speaker.rate, SAMPLE_RATE)
        self.aec = None
        if options.aec:
            from agent.transports.aec import EchoCanceller

            self.aec = EchoCanceller()
        self._primed = False
        self.underruns = 0  # output callbacks that found the jitter buffer short: silence played
        self.input_overflows = 0  # PortAudio's own flags
        self.output_underflows = 0
        self.late_chunks = 0  # chunks dropped because the event loop fell behind
        self._mic_ready = threading.Event()
        self._stopping = threading.Event()
        self._stop_requested = False
        self._inbox: deque[CaptureChunk] = deque()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: list = []
        self._thread: threading.Thread | None = None
        self.error: DeviceError | None = None
        self.device_latency_ms: dict[str, float] = {}

    # -- lifecycle --

    def start(self) -> None:
        sd = _sounddevice()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        opts = self.options
        try:
            for what, dev, cls, cb in (("microphone", self.mic, sd.InputStream, self._on_mic),
                                       ("speaker", self.speaker, sd.OutputStream, self._on_speaker)):
                try:
                    self._streams.append(cls(device=dev.index, samplerate=dev.rate, channels=dev.channels,
                                             dtype="float32", latency=opts.latency, callback=cb,
                                             finished_callback=lambda what=what, dev=dev: self._on_finished(what, dev)))
                except sd.PortAudioError as e:
                    raise DeviceError(f"cannot open the {what} {dev.name!r}: {e}. Is it unplugged or in use by "
                                      "another program? See --list-devices") from None
            self._thread = threading.Thread(target=self._capture, name="duplex-capture")
            self._thread.start()
            for stream in self._streams:
                stream.start()
        except sd.PortAudioError as e:
            self.close()
            raise DeviceError(f"cannot start the sound devices: {e}") from None
        except BaseException:
            self.close()
            raise
        self.device_latency_ms = {what: round(stream.latency * 1000, 1)
                                  for what, stream in zip(("input", "output"), self._streams)}
        if self.aec:
            self.aec.set_delay_hint(round(sum(self.device_latency_ms.values())))

    def request_stop(self) -> None:
        """From the event loop (a Ctrl-C handler): next_chunk returns None."""
        self._stop_requested = True
        if self._wake:
            self._wake.set()

    def close(self) -> None:
        self._stopping.set()
        self._mic_ready.set()  # wakes the capture thread to exit
        streams, self._streams = self._streams, []
        for stream in streams:
            try:
                stream.abort()
                stream.close()
            except Exception as e:  # a device already gone cannot be stopped cleanly: it is stopped anyway
                log.info("closing %s: %s", stream, e)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- the event loop's side --

    async def next_chunk(self) -> CaptureChunk | None:
        while not self._inbox:
            if self.error is not None:
                raise self.error
            if self._stop_requested:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._inbox.popleft()

    def play(self, chunk: np.ndarray) -> None:
        """Queue one agent chunk (float32, 16 kHz) for the speaker."""
        self._out_ring.write(self._to_speaker.process(chunk))

    def _deliver(self, chunk: CaptureChunk) -> None:
        self._inbox.append(chunk)
        while len(self._inbox) > 8:  # the loop is over a second behind: hear the present, not the past
            self._inbox.popleft()
            self.late_chunks += 1
        self._wake.set()

    def _set_error(self, error: DeviceError) -> None:
        if self.error is None:
            self.error = error
        self._wake.set()

    def _fail(self, error: DeviceError) -> None:
        """From any thread."""
        try:
            self._loop.call_soon_threadsafe(self._set_error, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # -- device threads: copy, count, nothing more --

    def _on_mic(self, indata, frames, time, status) -> None:
        if status.input_overflow:
            self.input_overflows += 1
        self._mic_ring.write(indata[:, 0] if indata.shape[1] == 1 else indata.mean(axis=1))
        self._mic_ready.set()

    def _on_speaker(self, outdata, frames, time, status) -> None:
        if status.output_underflow:
            self.output_underflows += 1
        mono = np.zeros(frames, np.float32)
        if not self._primed and len(self._out_ring) >= self._prime:
            self._primed = True
        if self._primed and self._out_ring.read_into(mono) < frames:
            self.underruns += 1  # silence fills the rest; play again once the buffer is primed
            self._primed = False
        outdata[:] = mono[:, None]
        self._played.write(mono)

    def _on_finished(self, what: str, dev: Device) -> None:
        if not self._stopping.is_set():
            self._fail(DeviceError(f"the {what} {dev.name!r} stopped: unplugged, or taken by another program"))

    # -- the capture thread --

    def _capture(self) -> None:
        chunker = _Chunker(self.n)
        try:
            while True:
                if not self._mic_ready.wait(self.options.stall_s):
                    raise DeviceError(f"the microphone {self.mic.name!r} delivered no audio for "
                                      f"{self.options.stall_s:g} s: unplugged, or taken by another program?")
                if self._stopping.is_set():
                    return
                self._mic_ready.clear()
                raw = self._from_mic.process(self._mic_ring.read_all())
                far = self._from_played.process(self._played.read_all())
                chunker.far(far)
                if self.aec is not None:
                    self.aec.render(far)  # played before its echo can reach the microphone
                    clean = self.aec.capture(raw)
                else:
                    clean = raw
                for chunk in chunker.push(clean, raw):
                    self._loop.call_soon_threadsafe(self._deliver, chunk)
        except DeviceError as e:
            self._fail(e)
        except Exception as e:  # a bug, not the user's device: say so, and end the run cleanly
            log.exception("the capture thread failed")
            self._fail(DeviceError(f"audio capture failed: {e!r}"))

    def stats(self) -> dict:
        return {
            "input_device": f"{self.mic.name} ({self.mic.hostapi}, {self.mic.rate} Hz, {self.mic.channels} ch)",
            "output_device": f"{self.speaker.name} ({self.speaker.hostapi}, {self.speaker.rate} Hz, "
                             f"{self.speaker.channels} ch)",
            "aec": self.aec.stats if self.aec else "off",
            "jitter_buffer_ms": round(self._prime / self.speaker.rate * 1000),
            "output_underruns": self.underruns,
            "output_dropped_ms": round(self._out_ring.dropped / self.speaker.rate * 1000),
            "input_dropped_ms": round(self._mic_ring.dropped / self.mic.rate * 1000),
            "portaudio_xruns": {"input_overflows": self.input_overflows, "output_underflows": self.output_underflows},
            "late_chunks": self.late_chunks,
            "device_latency_ms": self.device_latency_ms,
        }


# -- a conversation ------------------------------------------------------------------------------


class DeviceClock(ChunkClock):
    """Ticks as the microphone completes chunks; records how late each came
    against the first one + k T (the capture path's jitter and drift)."""

    def arrived(self) -> int:
        now = self._loop.time()
        if self.k == 0:
            self.start = now - self.chunk_s
        self.lags.append(now - (self.start + (self.k + 1) * self.chunk_s))
        k, self.k = self.k, self.k + 1
        return k


@dataclass(frozen=True)
class LocalOptions:
    audio: AudioOptions = AudioOptions()
    record_dir: Path | None = None  # conversation.wav, events.jsonl, timeline.jsonl, summary.json (+ aec.wav)
    opening: str | None = None  # a line the agent says first
    max_duration_s: float | None = None  # None: until stopped


async def run_local(engine: Engine, options: LocalOptions = LocalOptions(), *,
                    on_event: Callable[[Event], None] | None = None,
                    on_capture: Callable[[CaptureChunk], None] | None = None,
                    stop: asyncio.Event | None = None) -> dict:
    """Talk through the local devices until ``stop`` is set, ``max_duration_s``
    passes or a device fails; return the summary (replay's, plus "audio" and,
    when a device failed, "device_error"). ``DeviceError`` if the devices
    cannot be opened at all.

    ``on_capture`` sees each tick's ``CaptureChunk`` before the session does
    (the residual-echo hook).
    """
    n = engine.config.chunk_samples
    tick = n / SAMPLE_RATE
    audio = LocalAudio(n, options.audio)  # picks the devices: a bad name fails before the models warm up
    session = Session(engine, on_event=on_event)
    await session.warm_up()
    clock = DeviceClock(tick)
    user, raw, agent = [], [], [np.zeros(n, np.float32)]
    device_error = None
    watcher = asyncio.create_task((stop or asyncio.Event()).wait(), name="duplex-local-stop")
    watcher.add_done_callback(lambda _: audio.request_stop())
    try:
        audio.start()
        if options.opening:
            session.say(options.opening)
        while options.max_duration_s is None or clock.k * tick < options.max_duration_s:
            cap = await audio.next_chunk()
            if cap is None:
                break
            clock.arrived()
            if on_capture:
                on_capture(cap)
            user.append(cap.clean)
            raw.append(cap.raw)
            out = session.step(cap.clean)
            audio.play(out)
            agent.append(out)
    except DeviceError as e:
        if not audio.device_latency_ms:
            raise  # never opened: nothing to summarize
        device_error = str(e)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        audio.close()
        await session.close()
    summary = summarize(session, clock, (len(user) + 1) * tick, [])
    summary["audio"] = audio.stats()
    if device_error:
        summary["device_error"] = device_error
    if options.record_dir:
        _record(Path(options.record_dir), session, user, raw, agent, summary)
    return summary


def _record(out_dir: Path, session: Session, user: list[np.ndarray], raw: list[np.ndarray],
            agent: list[np.ndarray], summary: dict) -> None:
    """Replay's outputs; aec.wav holds the microphone before (left) and after (right) the canceller."""
    out_dir.mkdir(parents=True, exist_ok=True)
    silence = [np.zeros(session.config.chunk_samples, np.float32)]
    write_stereo(out_dir / "conversation.wav", np.concatenate(user + silence), np.concatenate(agent))
    write_session_logs(out_dir, session)
    write_stereo(out_dir / "aec.wav", np.concatenate(raw + silence), np.concatenate(user + silence))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

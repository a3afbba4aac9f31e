"""The local microphone/speaker transport, on real sound devices.

A private PulseAudio server gives PortAudio two real devices: the agent's
speaker is a pipe sink and its microphone a pipe source. Between them the test
builds a room: what the speaker plays comes back into the microphone after a
delay and an attenuation (the echo), mixed with the user's voice. The room is
paced by the speaker's clock, as a real room is by the sound card's. The agent
opens the ALSA "pulse" device at its default rate (44.1 kHz, stereo), so
resampling to and from 16 kHz is on the path too.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from agent.config import SAMPLE_RATE
from agent.events import AgentSpeechEnd, AgentSpeechStart, Turn
from agent.transports.aec import EchoCanceller
from agent.transports.local import (AudioOptions, DeviceError, LocalAudio, LocalOptions, SampleRing,
                                    StreamResampler, list_devices, pick_device, run_local)
from speech_encoder.audio import resample

ROOM_RATE = 48000  # the pipe devices' rate: PulseAudio converts to and from the agent's 44.1 kHz
BLOCK = ROOM_RATE // 100  # the room moves sound 10 ms at a time
LONG_ANSWER = (
    "Paris is the capital of France and its largest city. It sits on the river Seine, in the north of the country. "
    "The city is famous for its museums, such as the Louvre, which holds the Mona Lisa. "
    "The Eiffel Tower was built for the world fair of eighteen eighty nine, and at first many people disliked it. "
    "Today millions of visitors climb it every year to look out over the roofs and the long straight avenues. "
    "Paris is also known for its cafes, its bakeries, and its little bookshops along the river.")
FIGURES = Path(os.environ.get("DUPLEX_LOCAL_FIGURES", "/tmp/duplex-local-figures.json"))


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x.astype(np.float64))) + 1e-12))


def record_figure(name: str, value) -> None:
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures[name] = value
    FIGURES.write_text(json.dumps(figures, indent=2))
    print(f"{name}: {value}")


# -- the parts, without devices --------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [(44100, 16000), (16000, 44100), (48000, 16000), (16000, 48000), (16000, 16000)])
def test_streaming_resampling_equals_resampling_the_whole_signal(src, dst):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.3, src).astype(np.float32)
    r = StreamResampler(src, dst)
    pieces, i = [], 0
    while i < len(x):  # ragged pieces, as device callbacks deliver them
        n = int(rng.integers(1, 2000))
        pieces.append(r.process(x[i:i + n]))
        i += n
    streamed = np.concatenate(pieces)
    whole = resample(x, src, dst)
    waiting = 11 * max(1, dst // src + 1)  # the outputs of the last ~10 inputs wait for input that never comes
    assert len(whole) - waiting <= len(streamed) <= len(whole)
    np.testing.assert_allclose(streamed, whole[:len(streamed)], atol=1e-5)


def test_a_full_ring_drops_the_oldest_samples_and_counts_them():
    ring = SampleRing(capacity=10)
    ring.write(np.arange(6, dtype=np.float32))
    ring.write(np.arange(6, 12, dtype=np.float32))
    assert len(ring) == 10 and ring.dropped == 2
    out = np.full(4, -1, np.float32)
    assert ring.read_into(out) == 4
    assert out.tolist() == [2, 3, 4, 5]
    assert ring.read_all().tolist() == list(range(6, 12))
    assert ring.read_into(out) == 0


def test_the_canceller_removes_a_delayed_echo_and_keeps_the_near_talker(speech):
    far = speech(LONG_ANSWER[:160]) * 0.7
    near = speech("Stop, wait a moment please.", voice="espeak") * 0.6  # as loud as the echo
    delay = int(0.08 * SAMPLE_RATE)
    room = np.zeros(600)
    room[[0, 150, 420]] = [0.5, 0.2, -0.1]  # a direct path and two reflections
    echo = np.concatenate([np.zeros(delay), np.convolve(far, room)[:len(far)]]).astype(np.float32)
    talk_at = len(echo) - len(near) - SAMPLE_RATE
    mic = echo.copy()
    mic[talk_at:talk_at + len(near)] += near
    reference = np.concatenate([far, np.zeros(delay, np.float32)])
    aec = EchoCanceller()
    out = []
    for i in range(0, len(mic), 800):  # 50 ms at a time, the reference never later than its echo
        aec.render(reference[i:i + 800])
        out.append(aec.capture(mic[i:i + 800]))
    clean = np.concatenate(out)
    assert 0 <= len(mic) - len(clean) < 160  # a partial 10 ms frame waits for the next call
    settled = slice(2 * SAMPLE_RATE, talk_at)  # echo alone, after two seconds of adaptation
    erle = db(mic[settled]) - db(clean[settled])
    assert erle > 20, erle
    # Double talk: the user's words come through (the module delays its output by a few ms).
    heard = clean[talk_at:talk_at + len(near) + 480]
    match = max(np.corrcoef(heard[lag:lag + len(near)], near)[0, 1] for lag in range(0, 480, 8))
    assert match > 0.5, match
    assert abs(db(heard) - db(near)) < 6


# -- a room around real devices ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    """A private PulseAudio server (root in a container is fine: --system=no with its own dirs)."""
    if not shutil.which("pulseaudio") or not shutil.which("pactl"):
        pytest.skip("pulseaudio is not installed (run scripts/system-deps.sh)")
    home = tmp_path_factory.mktemp("pulse")
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home), "PULSE_RUNTIME_PATH": str(home)}
    socket = home / "native"
    script = home / "server.pa"
    script.write_text(f"load-module module-native-protocol-unix auth-anonymous=1 socket={socket}\n")
    # --daemonize returns once the server is ready: nothing to wait for.
    subprocess.run(["pulseaudio", "-n", "--daemonize=yes", "--use-pid-file=yes", "--exit-idle-time=-1",
                    "--system=no", "-F", str(script), "--log-target=file:" + str(home / "pulse.log")],
                   env=env, check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PULSE_SERVER", f"unix:{socket}")
        yield home
    subprocess.run(["pulseaudio", "--kill"], env=env, check=False)


def pactl(*args: str) -> str:
    return subprocess.run(["pactl", *args], check=True, capture_output=True, text=True).stdout.strip()


class Room:
    """The air between the agent's speaker and its microphone, 10 ms at a time.

    mic = echo_gain * speaker(t - echo_delay) + the user's voice. Keeps what
    the speaker played and both parts of what the microphone heard, on the
    room's own clock (48 kHz samples since the room opened).
    """

    def __init__(self, home: Path, echo_delay_s: float = 0.1, echo_gain: float = 0.5):
        self.speaker_fifo, self.mic_fifo = home / "speaker.fifo", home / "mic.fifo"
        self.modules = [
            pactl("load-module", "module-pipe-sink", "sink_name=agent_speaker", f"file={self.speaker_fifo}",
                  "format=s16le", f"rate={ROOM_RATE}", "channels=2", "use_system_clock_for_timing=yes"),
            pactl("load-module", "module-pipe-source", "source_name=agent_mic", f"file={self.mic_fifo}",
                  "format=s16le", f"rate={ROOM_RATE}", "channels=1"),
        ]
        pactl("set-default-sink", "agent_speaker")
        pactl("set-default-source", "agent_mic")
        self.echo_gain = echo_gain
        self._delay = deque([np.zeros(BLOCK, np.float32)] * round(echo_delay_s * 100))
        self._lock = threading.Lock()
        self._voice = np.zeros(0, np.float32)
        self.voice_spans: list[tuple[int, int]] = []  # [start, end) of each thing the user said, room samples
        self.played: list[np.ndarray] = []
        self.echo: list[np.ndarray] = []
        self.user: list[np.ndarray] = []
        self.position = 0
        self.ended = threading.Event()  # the speaker went away (unplugged) or the room was closed
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="test-room")
        self._thread.start()

    def say(self, audio16k: np.ndarray) -> None:
        """The user speaks into the microphone now (after what they are already saying)."""
        voice = resample(audio16k, SAMPLE_RATE, ROOM_RATE)
        with self._lock:
            start = self.position + len(self._voice)
            self._voice = np.concatenate([self._voice, voice])
            self.voice_spans.append((start, start + len(voice)))

    def _run(self) -> None:
        pending = b""
        # Not blocking: with nobody recording, the source stops reading and a real room's sound is lost too.
        mic = os.open(self.mic_fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            with open(self.speaker_fifo, "rb", buffering=0) as speaker:
                while not self._closing:
                    data = speaker.read(4 * BLOCK)
                    if not data:
                        break  # the sink was unloaded
                    pending += data
                    while len(pending) >= 4 * BLOCK:
                        block = np.frombuffer(pending[:4 * BLOCK], np.int16).reshape(-1, 2)[:, 0] / 32768.0
                        pending = pending[4 * BLOCK:]
                        try:
                            os.write(mic, self._step(block.astype(np.float32)))  # 960 bytes: all or nothing
                        except BlockingIOError:
                            pass
        finally:
            os.close(mic)
            self.ended.set()

    def _step(self, played: np.ndarray) -> bytes:
        self._delay.append(played)
        echo = self._delay.popleft() * self.echo_gain
        with self._lock:
            user = np.zeros(BLOCK, np.float32)
            take = min(BLOCK, len(self._voice))
            user[:take], self._voice = self._voice[:take], self._voice[take:]
            self.position += BLOCK
        self.played.append(played)
        self.echo.append(echo)
        self.user.append(user)
        return (np.clip(echo + user, -1, 1) * 32767).astype(np.int16).tobytes()

    def track(self, name: str) -> np.ndarray:
        """A whole track, resampled to 16 kHz."""
        return resample(np.concatenate(getattr(self, name) or [np.zeros(0, np.float32)]), ROOM_RATE, SAMPLE_RATE)

    def unplug_speaker(self) -> None:
        pactl("unload-module", self.modules.pop(0))

    def close(self) -> None:
        self._closing = True
        self._thread.join()
        for module in self.modules:
            subprocess.run(["pactl", "unload-module", module], check=False, capture_output=True)


@pytest.fixture
def room(pulse):
    rooms = []

    def make(**kwargs) -> Room:
        rooms.append(Room(pulse, **kwargs))
        return rooms[-1]

    yield make
    for r in rooms:
        r.close()


class Conversation:
    """Drives run_local from the test: events seen, and a stop once a condition holds."""

    def __init__(self):
        self.events = []
        self.stop = asyncio.Event()
        self.ticks = 0
        self.on_tick = None  # called with the CaptureChunk each tick

    def on_event(self, e) -> None:
        self.events.append(e)

    def on_capture(self, cap) -> None:
        self.ticks += 1
        if self.on_tick:
            self.on_tick(cap)

    def first(self, kind):
        return next((e for e in self.events if isinstance(e, kind)), None)


def converse(engine, conv: Conversation, options: LocalOptions) -> dict:
    return asyncio.run(run_local(engine, options, on_event=conv.on_event, on_capture=conv.on_capture, stop=conv.stop))


def test_the_devices_are_listed_and_a_wrong_name_is_refused(room):
    room()
    assert "pulse" in list_devices()
    mic = pick_device("pulse", "input")
    assert mic.rate > 0 and 1 <= mic.channels <= 2
    with pytest.raises(DeviceError, match="matches 0 devices"):
        pick_device("no such microphone", "input")
    with pytest.raises(DeviceError, match="no output device #999"):
        pick_device("999", "output")


def test_a_sound_server_that_is_gone_gives_a_clear_error(pulse, monkeypatch):
    monkeypatch.setenv("PULSE_SERVER", f"unix:{pulse}/nothing-here")
    audio = LocalAudio(2560, AudioOptions("pulse", "pulse", aec=False))

    async def start():
        audio.start()

    with pytest.raises(DeviceError, match="cannot open the microphone 'pulse'"):
        asyncio.run(start())
    audio.close()  # idempotent after a failed start


# -- the agent in the room ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_spoken_question_is_answered_through_the_speaker(engine, room, speech, tmp_path):
    r = room(echo_gain=0.3)
    question = speech("What is the capital of France?")
    conv = Conversation()
    asked = []

    def on_tick(cap):
        if not asked:
            r.say(question)  # the agent is listening: ask
            asked.append(cap.k)
        end = next((e for e in conv.events if isinstance(e, AgentSpeechEnd)), None)
        if end is not None and cap.k * 0.16 > end.t + 1.0:
            conv.stop.set()

    conv.on_tick = on_tick
    summary = converse(engine, conv, LocalOptions(AudioOptions("pulse", "pulse"), tmp_path / "rec", max_duration_s=60))
    turn = conv.first(Turn)
    assert turn is not None, summary
    answer = engine.asr.transcribe(r.track("played")).text
    assert "paris" in answer.lower(), answer
    for name in ("conversation.wav", "events.jsonl", "timeline.jsonl", "summary.json", "aec.wav"):
        assert (tmp_path / "rec" / name).exists()
    # The latency a listener in the room hears: end of the question -> first sound from the speaker.
    played = np.concatenate(r.played)
    asked_end = r.voice_spans[0][1]
    loud = np.flatnonzero(np.abs(played[asked_end:]) > 0.01)
    room_latency = loud[0] / ROOM_RATE if len(loud) else None
    record_figure("local_session_latency_s", turn.latency)
    record_figure("local_room_latency_s", room_latency)
    record_figure("local_audio_stats", summary["audio"])
    assert summary["audio"]["output_underruns"] <= 2, summary["audio"]


def run_echo_loop(engine, room, speech, aec: bool, cut_in_after_s: float | None, seconds: float):
    """The agent says LONG_ANSWER on open speakers; the user may cut in. Returns (summary, conv, ticks)."""
    r = room(echo_delay_s=0.1, echo_gain=0.5)  # -6 dB, 100 ms: a laptop on a desk
    cut_in = speech("Sorry, stop there. Tell me about London instead.", voice="espeak")
    conv = Conversation()
    ticks = []  # (k, raw, clean, agent speaking, user voice in the room)
    state = {"cut_k": None}

    def on_tick(cap):
        start = conv.first(AgentSpeechStart)
        t = cap.k * 0.16
        speaking = start is not None and not any(isinstance(e, AgentSpeechEnd) for e in conv.events)
        ticks.append((cap.k, cap.raw, cap.clean, speaking, state["cut_k"] is not None))
        if cut_in_after_s is not None and start is not None and state["cut_k"] is None and t > start.t + cut_in_after_s:
            r.say(cut_in)
            state["cut_k"] = cap.k
        if t > seconds:
            conv.stop.set()

    conv.on_tick = on_tick
    summary = converse(engine, conv, LocalOptions(AudioOptions("pulse", "pulse", aec=aec), opening=LONG_ANSWER,
                                                  max_duration_s=seconds + 30))
    return summary, conv, ticks, state["cut_k"]


@pytest.mark.e2e
def test_with_echo_cancellation_the_agent_does_not_interrupt_itself_but_the_user_can(engine, room, speech):
    # LONG_ANSWER lasts about 35 s: the user cuts in near its end, after 22 s of the agent hearing itself.
    summary, conv, ticks, cut_k = run_echo_loop(engine, room, speech, aec=True, cut_in_after_s=22.0, seconds=45)
    assert cut_k is not None, "the agent never started speaking"
    before = [t for t in ticks if t[0] < cut_k]
    interrupts_before = [e for e in conv.events if type(e).__name__ == "Decision" and e.decision == "interrupt"
                         and e.t < cut_k * 0.16]
    assert not interrupts_before, interrupts_before  # 22 s of its own voice in the microphone
    assert summary["interruptions"] >= 1, summary  # the user's cut-in, mixed into the same echo, stops it
    stop = next(e for e in conv.events if isinstance(e, AgentSpeechEnd))
    assert stop.reason == "interrupted" and stop.t > cut_k * 0.16
    # Echo alone: ticks where the agent's voice is in the microphone, after the canceller's first second.
    echo_ticks = [t for t in before if t[3] and db(t[1]) > -40][6:]
    raw, clean = np.concatenate([t[1] for t in echo_ticks]), np.concatenate([t[2] for t in echo_ticks])
    erle = db(raw) - db(clean)
    record_figure("aec_erle_db", round(erle, 1))
    record_figure("aec_self_interruptions_per_min", round(len(interrupts_before) / (len(before) * 0.16 / 60), 2))
    record_figure("aec_stop_latency_s", summary["median_stop_latency_s"])
    assert erle > 15, erle


@pytest.mark.e2e
def test_without_echo_cancellation_the_agent_interrupts_itself(engine, room, speech):
    summary, conv, ticks, _ = run_echo_loop(engine, room, speech, aec=False, cut_in_after_s=None, seconds=30)
    minutes = len(ticks) * 0.16 / 60
    record_figure("no_aec_self_interruptions_per_min", round(summary["interruptions"] / minutes, 2))
    assert summary["interruptions"] >= 1, summary


@pytest.mark.e2e
def test_unplugging_the_speaker_mid_conversation_ends_with_a_clear_message(engine, room):
    r = room(echo_gain=0.3)
    conv = Conversation()

    def on_tick(cap):
        start = conv.first(AgentSpeechStart)
        if start and len(r.modules) == 2 and cap.k * 0.16 > start.t + 2:  # two seconds into its answer
            r.unplug_speaker()

    conv.on_tick = on_tick
    summary = converse(engine, conv, LocalOptions(AudioOptions("pulse", "pulse"), opening=LONG_ANSWER,
                                                  max_duration_s=60))
    assert "device_error" in summary, summary
    assert "unplugged" in summary["device_error"], summary["device_error"]
    record_figure("unplug_message", summary["device_error"])


# -- the command line ----------------------------------------------------------------------------------


def test_the_terminal_shows_both_sides_the_state_and_each_turns_latency():
    import io

    from agent.events import AgentText, StateChanged, TranscriptEvent
    from agent.transports.local_cli import TerminalView

    out = io.StringIO()
    view = TerminalView(out)
    for e in (TranscriptEvent(1.2, "What is the capital of France?"), StateChanged(1.2, "thinking"),
              AgentText(1.9, "The capital of France is Paris."), StateChanged(2.0, "speaking"),
              Turn(4.0, 1, "What is the capital of France?", "The capital of France is Paris.", 1.0, 2.0, 1.0,
                   False, 300.0, 250.0, 120.0, 40)):
        view.on_event(e)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("you:   What is the capital of France?")
    assert "(thinking)" in lines[1] and "agent: The capital of France is Paris." in lines[2]
    assert "turn 1: latency 1000 ms" in lines[4]


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen([sys.executable, str(root / "run_agent.py"), "cli", *args], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_a_missing_device_is_a_message_not_a_traceback(pulse):
    proc = run_cli("--input-device", "no such microphone")
    out, err = proc.communicate()
    assert proc.returncode == 1
    assert "audio device error: input device 'no such microphone' matches 0 devices" in err
    assert "Traceback" not in err


@pytest.mark.e2e
def test_ctrl_c_ends_the_conversation_cleanly_with_a_summary(room, tmp_path):
    room()
    proc = run_cli("--input-device", "pulse", "--output-device", "pulse", "--say", "Hello, I am listening.",
                   "--record", str(tmp_path / "rec"))
    for line in proc.stderr:  # the models load first
        if line.startswith("listening"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "session:" in out and "echo cancellation on" in out, out
    assert "Traceback" not in err, err
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())
    assert summary["audio"]["aec"] != "off"

"""``run_agent.py cli``: talk to the agent through this computer's microphone and speakers.

``register(subparsers)`` adds the subcommand to run_agent.py's parser. Importing
this module is cheap: the models, PortAudio and the canceller load only when
the command runs.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import TextIO

from agent.config import add_config_flags, config_from_args
from agent.events import AgentText, Event, StateChanged, TranscriptEvent, TranscriptRejected, Turn


def register(subparsers) -> None:
    c = subparsers.add_parser("cli", help="talk through this computer's microphone and speakers")
    c.add_argument("--list-devices", action="store_true", help="list the sound devices and exit")
    c.add_argument("--input-device", help="microphone: index or part of the name (default: the system's)")
    c.add_argument("--output-device", help="speaker: index or part of the name (default: the system's)")
    c.add_argument("--no-aec", dest="aec", action="store_false",
                   help="no echo cancellation (for a headset: the microphone cannot hear the speaker)")
    c.add_argument("--jitter-ms", type=int, default=80,
                   help="audio kept in hand beyond one chunk, so playback never runs dry (default 80)")
    c.add_argument("--device-latency-ms", type=float, help="PortAudio's device latency (default: its 'high')")
    c.add_argument("--record", metavar="DIR", help="write conversation.wav, events.jsonl, summary.json (as replay) "
                                                   "and aec.wav (the microphone before and after the canceller)")
    c.add_argument("--say", metavar="TEXT", help="a line the agent says first")
    c.add_argument("--duration", type=float, help="stop after this many seconds (default: at Ctrl-C)")
    add_config_flags(c)
    c.set_defaults(func=cmd_cli)


class TerminalView:
    """Live lines: what each side said, the agent's state, each turn's latency (media time)."""

    def __init__(self, out: TextIO = sys.stdout):
        self.out = out

    def _line(self, t: float, text: str) -> None:
        print(f"[{t:7.2f}s] {text}", file=self.out, flush=True)

    def on_event(self, e: Event) -> None:
        if isinstance(e, TranscriptEvent):
            self._line(e.t, f"you:   {e.text}")
        elif isinstance(e, TranscriptRejected) and e.text:
            self._line(e.t, f"(not answered: {e.text!r}, {e.reason})")
        elif isinstance(e, AgentText):
            self._line(e.t, f"agent: {e.text}")
        elif isinstance(e, StateChanged):
            self._line(e.t, f"       ({e.state})")
        elif isinstance(e, Turn):
            cut = ", interrupted" if e.interrupted else ""
            self._line(e.t, f"turn {e.index}: latency {e.latency * 1000:.0f} ms (asr {e.asr_ms:.0f}, first token "
                            f"{e.llm_first_token_ms:.0f}, first audio {e.first_audio_ms:.0f} ms{cut})")

    def summary(self, s: dict) -> None:
        audio = s["audio"]
        aec = audio["aec"]
        aec_text = "off" if aec == "off" else f"on, ERLE {aec['erle_db']} dB" if aec["erle_db"] is not None else "on"
        lat = f"{s['median_latency_s'] * 1000:.0f} ms" if s["median_latency_s"] is not None else "-"
        print(f"\nsession: {s['duration_s']:.1f} s, {len(s['turns'])} turns, median latency {lat} "
              f"(+ {audio['jitter_buffer_ms']} ms playback buffer), {s['interruptions']} interruptions, "
              f"{audio['output_underruns']} playback underruns, echo cancellation {aec_text}",
              file=self.out, flush=True)


def cmd_cli(args: argparse.Namespace) -> int:
    from agent.transports.local import AudioOptions, DeviceError, LocalOptions, list_devices, pick_device
    from run_agent import load_engine

    try:
        if args.list_devices:
            print(list_devices())
            return 0
        audio = AudioOptions(input_device=args.input_device, output_device=args.output_device, aec=args.aec,
                             jitter_ms=args.jitter_ms,
                             latency=args.device_latency_ms / 1000 if args.device_latency_ms else "high")
        for kind, spec in (("input", audio.input_device), ("output", audio.output_device)):
            pick_device(spec, kind)  # a wrong device fails now, not after the models load
        options = LocalOptions(audio, Path(args.record) if args.record else None, args.say, args.duration)
        engine = load_engine(config_from_args(args))
        try:
            summary = asyncio.run(_converse(engine, options))
        finally:
            engine.close()
    except DeviceError as e:
        print(f"duplex: audio device error: {e}", file=sys.stderr)
        return 1
    if args.record:
        print(f"wrote {args.record}/conversation.wav, events.jsonl, summary.json, aec.wav")
    if "device_error" in summary:
        print(f"duplex: audio device error: {summary['device_error']}", file=sys.stderr)
        return 1
    return 0


async def _converse(engine, options) -> dict:
    """One conversation until Ctrl-C (or SIGTERM): devices closed and threads joined before the summary."""
    from agent.transports.local import run_local

    view = TerminalView()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("listening; Ctrl-C ends the conversation", file=sys.stderr, flush=True)
        summary = await run_local(engine, options, on_event=view.on_event, stop=stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    view.summary(summary)
    return summary

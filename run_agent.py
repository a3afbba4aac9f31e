"""duplex: one command line, one subcommand per way of using the engine.

    python run_agent.py models [--check] [--all]
    python run_agent.py replay --input USER.wav --out DIR
    python run_agent.py cli [--list-devices] [--input-device N] [--output-device N] [--no-aec] [--record DIR]
    python run_agent.py simulate --out DIR [--latency-ms 0,80,160,240,400]
    python run_agent.py serve [--host H --port P]
    python run_agent.py train-heads [--all] [--eval]
    python run_agent.py bench latency|tts|asr|webrtc|duplex
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# Nothing may reach a model hub: every weight comes from a pinned package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from agent.config import add_config_flags, config_from_args  # noqa: E402
from bench import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent


def cmd_models(args) -> int:
    from agent import models

    cfg = config_from_args(args)
    names = list(models.MODELS) if args.all else list(models.names_for(cfg.asr_model, cfg.llm))
    if args.check:
        rows = models.check_rows(cfg.cache_dir, names)
        print(f"cache: {cfg.cache_dir}")
        print(f"{'model':18} {'status':8} {'package':14} {'size':>9}  sha256 (pinned, of the package bytes)")
        for r in rows:
            size = f"{r['size'] / 1e6:.0f} MB" if r["size"] else "-"
            print(f"{r['name']:18} {r['status']:8} {r['package']:14} {size:>9}  {r['sha256']}")
        return 0 if all(r["status"] == "ready" for r in rows) else 1
    for name in names:
        state = models.status(cfg.cache_dir, name)
        if state == "ready" and not args.force:
            print(f"{name}: ready")
            continue
        t0 = time.monotonic()
        models.build(cfg.cache_dir, name)
        print(f"{name}: built in {time.monotonic() - t0:.1f} s")
    return 0


def load_engine(cfg):
    from agent.engine import Engine

    t0 = time.monotonic()
    engine = Engine.load(cfg)
    lt = engine.load_times
    print(f"models loaded in {time.monotonic() - t0:.1f} s (provision {lt.provision_s:.1f}, whisper {lt.asr_s:.1f}, "
          f"llm {lt.llm_s:.1f}, tts {lt.tts_s:.1f})", file=sys.stderr)
    return engine


def cmd_replay(args) -> int:
    from agent.transports.replay import ReplayOptions, replay_file

    cfg = config_from_args(args)
    engine = load_engine(cfg)
    try:
        summary = replay_file(engine, Path(args.input), Path(args.out), ReplayOptions(tail_s=args.tail))
    finally:
        engine.close()
    for t in summary["turns"]:
        flag = " (interrupted)" if t["interrupted"] else ""
        print(f"[{t['user_end']:6.2f}s] user: {t['user_text']}")
        print(f"[{t['agent_start']:6.2f}s] agent{flag}: {t['agent_text']}   (latency {t['latency'] * 1000:.0f} ms)")
    print(f"wrote {args.out}/conversation.wav, events.jsonl, summary.json")
    return 0


def cmd_simulate(args) -> int:
    import asyncio

    from agent.transports.link import LinkConfig
    from agent.transports.simulate import SimulationOptions, default_agents, sweep, sweep_row, sweep_table

    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    cfg = config_from_args(args)
    a, b = default_agents(args.persona_a, args.persona_b, args.opening_a)
    options = SimulationOptions(args.duration, LinkConfig(latencies[0], args.jitter_ms, args.loss), args.seed)
    engine = load_engine(cfg)
    try:
        results = asyncio.run(sweep(engine, a, b, Path(args.out), latencies, options))
    finally:
        engine.close()
    print(f"{machine()}; {cfg.llm}, chunk {cfg.chunk_ms} ms, jitter {args.jitter_ms:.0f} ms, loss {args.loss:.1%}; "
          "durations in ms; FTO as a listener between the agents hears it; 'yield med': at the ear of "
          "the agent that gave the floor away (a round trip more); 'react': the agents' own reaction time; "
          "'link': FTO minus the reaction, per transfer")
    print(sweep_table([sweep_row(k, m) for k, m in results.items()]))
    print(f"wrote {args.out}: conversation.wav, transcript.txt, events_a/b.jsonl, timeline.png, metrics.json "
          f"(per latency), fto.png, sweep.json")
    return 0


def cmd_bench(args) -> int:
    import importlib

    module = importlib.import_module(BENCHES[args.bench][0])
    return module.main(args, config_from_args(args), machine())


BENCHES = {
    "latency": ("bench.latency", "response and barge-in stop latency through replay, with stage times"),
    "tts": ("bench.tts", "first-chunk latency and real-time factor of each TTS backend"),
    "asr": ("bench.asr", "WER offline vs streaming, per-chunk cost, end-of-speech to transcript, prefill left"),
    "webrtc": ("web.cli", "response and barge-in stop latency at a WebRTC client over loopback"),
    "duplex": ("bench.duplex", "pause, backchannel, turn-taking, interruption and noise behaviour, after Full-Duplex-Bench"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duplex", description="full-duplex speech-to-speech voice agent")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v: progress; -vv: per-chunk detail")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="provision the model cache from the pinned packages")
    m.add_argument("--check", action="store_true", help="list each model with status, size and hash")
    m.add_argument("--all", action="store_true", help="every model, not just the configured ones")
    m.add_argument("--force", action="store_true", help="rebuild even if ready")
    add_config_flags(m)
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("replay", help="play a WAV into the agent as its microphone, in real time")
    r.add_argument("--input", required=True, help="the user's audio: a WAV at any rate, mono or stereo")
    r.add_argument("--out", required=True, help="folder for conversation.wav, events.jsonl, summary.json")
    r.add_argument("--tail", type=float, default=1.0, help="seconds of silence kept after the agent finishes")
    add_config_flags(r)
    r.set_defaults(func=cmd_replay)

    s = sub.add_parser("simulate", help="two agents talk over a simulated network link, in real time")
    s.add_argument("--out", required=True, help="output folder (one subfolder per latency in a sweep)")
    s.add_argument("--latency-ms", default="0", help="one-way link latency, ms; a comma list runs a sweep")
    s.add_argument("--jitter-ms", type=float, default=0.0, help="random extra delay per packet, up to this, ms; the receiver's jitter buffer adds as much "
                   "(mouth-to-ear = latency + jitter)")
    s.add_argument("--loss", type=float, default=0.0, help="packet loss rate, 0..1 (lost audio is silence)")
    s.add_argument("--duration", type=float, default=60.0, help="seconds of conversation per run")
    s.add_argument("--seed", type=int, default=0, help="seed of the links' jitter and loss")
    s.add_argument("--persona-a", default=None, help="system prompt of agent A (default: plans a trip, asks)")
    s.add_argument("--persona-b", default=None, help="system prompt of agent B (default: a friend who advises)")
    s.add_argument("--opening-a", default=None, help="A's opening line ('' for none)")
    add_config_flags(s)  # --chunk-ms, --llm, ...
    s.set_defaults(func=cmd_simulate)

    sub.add_parser("train-heads", add_help=False,  # dispatched in main(): its flags are its own
                   help="train the continue/interrupt/reject state heads (train-heads --help for its flags)")

    b = sub.add_parser("bench", help="benchmarks; they print figures with the machine they ran on")
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in BENCHES.items():
        bp = bsub.add_parser(name, help=help_text)
        __import__(module, fromlist=["add_arguments"]).add_arguments(bp)
        add_config_flags(bp)
        bp.set_defaults(func=cmd_bench)
    __import__("web.cli", fromlist=["register"]).register(sub)  # serve
    __import__("agent.transports.local_cli", fromlist=["register"]).register(sub)  # cli: microphone and speakers
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-heads"]:  # its flags are its own (argparse cannot pass "--help" through)
        from agent.train_heads import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.models import ModelError
    from speech_encoder.audio import AudioFormatError

    try:
        return args.func(args)
    except (ModelError, AudioFormatError, ValueError) as e:
        print(f"duplex: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``run_agent.py bench latency``: how fast the agent answers and stops, end to end.

Synthesized conversations go through ``replay`` in real time on the real
models: plain questions (response latency: end of user speech -> first agent
audio) and cut-ins 1.5-2.5 s into a long answer (barge-in stop latency: user
onset -> agent audio silent). It prints p50/p90 of both, tick jitter, underruns,
and the time spent in each stage, with the machine it ran on.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
from pathlib import Path


from agent.config import Config
from bench.corpus import Synthesizer

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Can you recommend a good name for a cat?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "How do I say hello in Spanish?",
    "What day comes after Monday?",
    "Is a tomato a fruit or a vegetable?",
    "What should I pack for a weekend at the beach?",
]
LONG_ASKS = [
    ("Tell me a long story about a brave knight and a dragon.", "Wait, stop. What is two plus two?"),
    ("Explain how a rainbow forms, in detail.", "Hold on, what time is it in Tokyo?"),
    ("Describe your ideal vacation in many sentences.", "No, stop. Tell me a joke instead."),
    ("Tell me everything you know about the moon.", "Actually, how far away is the sun?"),
    ("Give me a long list of reasons to learn the piano.", "Wait, wait. How about the guitar?"),
]
VOICES = ["flite:slt", "flite:awb", "espeak:en-us"]  # bench.corpus.Synthesizer names


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 4)


def run(config: Config, n_questions: int = 10, n_cutins: int = 5, out_dir: Path | None = None) -> dict:
    from agent.engine import Engine
    from agent.transports.replay import Utterance, UserScript, run_script

    for tool in ("flite", "espeak-ng"):
        if not shutil.which(tool):
            raise RuntimeError(f"bench latency needs {tool} (apt-get install {tool}, or scripts/system-deps.sh)")
    engine = Engine.load(config)
    voices = Synthesizer(config.cache_dir)
    speak = voices.speak
    tmp = Path(tempfile.mkdtemp(prefix="duplex-bench-"))
    out_dir = Path(out_dir) if out_dir else tmp / "runs"
    turns, stops, lags, underruns = [], [], [], 0
    try:
        scenarios = []
        for i, q in enumerate(QUESTIONS[:n_questions]):
            audio = speak(q, VOICES[i % len(VOICES)])
            scenarios.append((f"question{i}", UserScript([Utterance(audio, delay=0.3)])))
        for i, (ask, cut) in enumerate(LONG_ASKS[:n_cutins]):
            voice = VOICES[i % len(VOICES)]
            scenarios.append((f"cutin{i}", UserScript([
                Utterance(speak(ask, voice), delay=0.3),
                Utterance(speak(cut, voice), delay=1.5 + (i % 3) * 0.5, trigger="agent_start"),
            ])))
        for name, script in scenarios:
            summary = asyncio.run(run_script(engine, script, out_dir / name))
            print(f"  {name}: latencies {[t['latency'] for t in summary['turns']]} "
                  f"stops {summary['stop_latencies_s']}", flush=True)
            turns += summary["turns"]
            stops += summary["stop_latencies_s"]
            underruns += summary["underruns"]
            lags.append(summary["tick_lag_ms"].get("p99", 0.0))
    finally:
        engine.close()
    latencies = [t["latency"] for t in turns]
    return {
        "turns": len(turns),
        "response_latency_s": {"p50": pct(latencies, 0.5), "p90": pct(latencies, 0.9)},
        "barge_in_stop_latency_s": {"p50": pct(stops, 0.5), "p90": pct(stops, 0.9), "n": len(stops)},
        "tick_lag_p99_ms": max(lags) if lags else None,
        "underruns": underruns,
        "stage_ms_p50": {
            "asr": pct([t["asr_ms"] for t in turns], 0.5),
            "llm_first_token": pct([t["llm_first_token_ms"] for t in turns], 0.5),
            "first_audio_after_asr": pct([t["first_audio_ms"] for t in turns], 0.5),
            "prefill_tokens": pct([t["prefill_tokens"] for t in turns], 0.5),
        },
        "runs": str(out_dir),
    }


def main(args: argparse.Namespace, config: Config, machine: str) -> int:
    print(f"bench latency on {machine}; chunk {config.chunk_ms} ms, LLM {config.llm}, ASR {config.asr_model}")
    results = [run(config, args.questions, args.cutins) for _ in range(args.repeat)]
    for r in results:
        print(json.dumps(r, indent=2))
    if args.repeat > 1:
        med = {k: statistics.median(r[k]["p50"] for r in results if r[k]["p50"] is not None)
               for k in ("response_latency_s", "barge_in_stop_latency_s")}
        print("median over repeats of the p50s:", json.dumps(med))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--questions", type=int, default=10, help="plain-question scenarios (max 10)")
    parser.add_argument("--cutins", type=int, default=5, help="barge-in scenarios (max 5)")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the whole set, report each and the median")

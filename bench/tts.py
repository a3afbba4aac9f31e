"""``run_agent.py bench tts``: first-chunk latency and real-time factor of each voice.

Piper runs on the real "joe" voice. CosyVoice 2 runs on a real model folder when
``--tts-model-dir`` names one; otherwise only on the tiny random-weight
conformance model, whose figures measure the mechanics (streaming, flow cache),
not a voice: they are labelled so.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from agent import models
from agent.config import Config
from tts.cosyvoice2.bench import bench_tts

TEXTS = [
    "The capital of France is Paris.",
    "Sure, to make a cup of tea, boil the water first, then let the leaves steep for three minutes.",
    "I would pack sunscreen, a hat, a good book and a towel.",
]


def conformance_model() -> Path:
    base = Path(os.environ.get("DUPLEX_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
    return base / "cosyvoice2-conformance" / "model"


def main(args: argparse.Namespace, config: Config, machine: str) -> int:
    from tts.cosyvoice2 import CosyVoice2TTS
    from tts.piper import PiperTTS

    print(f"bench tts on {machine}")
    results = []
    piper = PiperTTS(models.ensure(config.cache_dir, "piper-joe"), config.tts_threads)
    results.append({"label": f"piper joe ({config.tts_threads} thread)", **bench_tts(piper, TEXTS, args.repeat)})
    if config.tts_model_dir:
        real = CosyVoice2TTS(config.tts_model_dir, speaker=config.tts_speaker or None)
        results.append({"label": f"cosyvoice2 {config.tts_model_dir} on {real.parts.device}",
                        **bench_tts(real, TEXTS, args.repeat)})
    tiny_dir = conformance_model()
    if tiny_dir.is_dir():
        tiny = CosyVoice2TTS(tiny_dir, seed=0, max_token_text_ratio=5.0)
        ids = [list(range(1, 1 + n)) for n in (10, 20, 40)]  # token ids: the tiny model has no tokenizer
        results.append({"label": "cosyvoice2 TINY RANDOM conformance model (mechanics only, not a voice)",
                        **bench_tts(tiny, ids, args.repeat)})
    else:
        print(f"(no CosyVoice 2 conformance model at {tiny_dir}: skipped)")
    for r in results:
        print(f"{r['label']}: first chunk median {r['first_chunk_s']['median'] * 1000:.0f} ms, "
              f"RTF median {r['rtf']['median']:.3f} over {r['runs']} runs")
    print(json.dumps(results, indent=2))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="runs per text")

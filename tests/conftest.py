"""Shared fixtures: speech synthesized on the spot, the real models loaded once, and
scripted replays with their events."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DUPLEX_QUIET", "1")

from agent.config import SAMPLE_RATE, config_from  # noqa: E402
from speech_encoder.audio import load_audio  # noqa: E402


def synthesize(text: str, path: Path, voice: str = "flite") -> Path:
    """Speak ``text`` into a WAV with a Debian TTS engine (flite 'slt' or espeak-ng)."""
    if voice == "flite" and shutil.which("flite"):
        subprocess.run(["flite", "-voice", "slt", "-t", text, "-o", str(path)], check=True)
    elif shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), text], check=True)
    else:
        pytest.skip("neither flite nor espeak-ng is installed (run scripts/system-deps.sh)")
    return path


@pytest.fixture
def speech(tmp_path):
    """speech(text, voice='flite') -> float32 mono 16 kHz samples."""
    counter = iter(range(1000))

    def make(text: str, voice: str = "flite") -> np.ndarray:
        return load_audio(synthesize(text, tmp_path / f"speech{next(counter)}.wav", voice), SAMPLE_RATE)

    return make


@pytest.fixture(scope="session")
def engine():
    """The real default models (Whisper tiny.en, Qwen2.5-0.5B, Piper joe), loaded once."""
    from agent.engine import Engine

    eng = Engine.load(config_from())
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def asr(engine):
    return engine.asr


@pytest.fixture(scope="session")
def small_llm():
    """SmolLM2-135M in float32: for the mechanics of the LLM's cache, not for answers."""
    from agent import models
    from agent.llm import ChatLLM

    return ChatLLM(models.ensure(config_from().cache_dir, "smollm2-135m"), threads=2, dtype="float32")


@pytest.fixture(scope="session")
def dual_and_int8():
    """The small model loaded as "dual" and as "dual-int8" (with the int8 copies
    the reply decodes with): for the mechanics of which forward uses which."""
    from agent import models
    from agent.llm import ChatLLM

    path = models.ensure(config_from().cache_dir, "smollm2-135m")
    return ChatLLM(path, threads=2, dtype="dual"), ChatLLM(path, threads=2, dtype="dual-int8")


def say(text: str, tmp_path: Path, name: str) -> np.ndarray:
    """``text`` spoken by flite as float32 16 kHz samples (kept as ``tmp_path/name.wav``)."""
    return load_audio(synthesize(text, tmp_path / f"{name}.wav"), SAMPLE_RATE)


def replay(engine, tmp_path: Path, *utterances) -> tuple[Path, dict]:
    """Play a scripted user (``Utterance``s) into a new session in real time;
    returns the output folder and the run's summary."""
    import asyncio

    from agent.transports.replay import UserScript, run_script

    summary = asyncio.run(run_script(engine, UserScript(list(utterances)), tmp_path / "out"))
    return tmp_path / "out", summary


def events_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def timeline(events: list[dict]) -> str:
    """The events that tell a run's story (not every chunk's "continue"), one a
    line: what a failed timing assertion shows."""
    told = [e for e in events if e["type"] != "agent_text" and e.get("decision") != "continue"]
    return "\n".join(f'{e["t"]:6.2f} {e["type"]} {e.get("decision") or e.get("text") or e.get("state") or ""}'
                     for e in told)

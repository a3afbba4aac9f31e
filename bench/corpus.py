"""Speech test sets synthesized on the spot from reference texts in bench/data/.

Voices cycle over three engines so that no single synthesizer's quirks decide
the result: Piper (the agent's own "joe" voice), flite (slt, kal, awb, rms) and
espeak-ng. Every utterance is float32 mono 16 kHz.

Piper samples noise as it speaks, so each synthesis of the same text differs;
the ASR set is therefore synthesized once and kept on disk (a new synthesis is a
new test set: it moved the streaming WER from run to run, docs/BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.config import SAMPLE_RATE
from speech_encoder.audio import load_audio, resample, write_wav

DATA = Path(__file__).parent / "data"
VOICES = ("piper:joe", "flite:slt", "espeak:en-us", "flite:kal", "flite:awb", "piper:joe", "flite:rms",
          "espeak:en-gb")


@dataclass(frozen=True)
class Utterance:
    id: str
    text: str  # the reference transcript
    voice: str  # "engine:voice"
    audio: np.ndarray  # float32 [n], 16 kHz

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def read_texts(name: str = "asr_utterances.txt") -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


class Synthesizer:
    """Speaks a text with one of VOICES; Piper is loaded on first use."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        self._piper = None

    def available(self, voice: str) -> bool:
        engine = voice.split(":")[0]
        if engine == "piper":
            return (self.cache_dir / "piper-joe" / "voice.onnx").exists()
        return shutil.which({"flite": "flite", "espeak": "espeak-ng"}[engine]) is not None

    def speak(self, text: str, voice: str) -> np.ndarray:
        engine, name = voice.split(":")
        if engine == "piper":
            if self._piper is None:
                from tts.piper import PiperTTS

                self._piper = PiperTTS(self.cache_dir / "piper-joe", threads=1)
            return resample(self._piper.synthesize(text), self._piper.sample_rate, SAMPLE_RATE)
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "u.wav"
            if engine == "flite":
                cmd = ["flite", "-voice", name, "-t", text, "-o", str(wav)]
            else:
                cmd = ["espeak-ng", "-v", name, "-s", "165", "-w", str(wav), text]
            subprocess.run(cmd, check=True, capture_output=True)
            return load_audio(wav, SAMPLE_RATE)


def asr_test_set(cache_dir: Path, limit: int | None = None, lead_s: float = 0.3,
                 store: Path | None = None) -> list[Utterance]:
    """The ASR benchmark's utterances: each text once, voices in turn, ``lead_s`` of
    silence before the speech (no silence after: the caller adds what it needs).
    Each is synthesized once into ``store`` (default ``cache_dir/bench-asr``, 16-bit
    WAV) and read back from there, the first time too: every run hears the same audio."""
    store = Path(store or Path(cache_dir) / "bench-asr")
    store.mkdir(parents=True, exist_ok=True)
    synth = Synthesizer(cache_dir)
    voices = [v for v in VOICES if synth.available(v)]
    if not voices:
        raise RuntimeError("no speech synthesizer available (piper-joe, flite or espeak-ng)")
    texts = read_texts()[:limit]
    out = []
    for i, text in enumerate(texts):
        voice = voices[i % len(voices)]
        path = store / f"{hashlib.sha1(f'{voice}|{text}'.encode()).hexdigest()[:16]}.wav"
        if not path.exists():
            part = path.with_suffix(".part")
            write_wav(part, synth.speak(text, voice), SAMPLE_RATE)
            part.replace(path)  # a run cut short leaves no half-written utterance
        audio = load_audio(path, SAMPLE_RATE)
        audio = np.concatenate([np.zeros(int(lead_s * SAMPLE_RATE), np.float32), audio])
        out.append(Utterance(f"u{i:03d}", text, voice, audio.astype(np.float32)))
    return out

"""Scenarios of ``bench duplex``: the user's side of each conversation, synthesized.

Five categories, after Full-Duplex-Bench (Lin et al., 2025), each scenario a
``UserScript`` for the replay transport plus what the scorer needs to know:

- pause: one long turn (> 5 s) with pauses of 0.4-1.0 s inside;
- backchannel: a request, then "mm-hmm" / "yeah" / "right"... 1-2 s into the answer;
- turntaking: a complete question, then silence;
- interruption: a request, then a new request 2-4 s into the answer, with the
  keywords an answer to the new request should hold;
- noise: a request, then a cough, a door slam, background speech (-15 dB) or
  side talk (-8 dB), during the answer or after it.

The texts live in bench/data/duplex/. Voices: Piper "joe" (the engine's own
voice package), flite (slt, awb, rms, kal) and espeak-ng (en-us, en-gb). Coughs
and door slams are synthesized (no recordings exist here); noise.txt describes
them. Everything is seeded: the same arguments give the same audio.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.signal import butter, sosfilt

from agent.config import SAMPLE_RATE
from speech_encoder.audio import load_audio, resample

DATA = Path(__file__).parent / "data" / "duplex"
CATEGORIES = ("pause", "backchannel", "turntaking", "interruption", "noise")
VOICES = ("piper:joe", "flite:slt", "flite:awb", "flite:rms", "flite:kal", "espeak-ng:en-us", "espeak-ng:en-gb")
SPEECH_RMS = 0.08  # -22 dBFS: the user's active speech level, every voice alike
FRAME = SAMPLE_RATE // 50  # 20 ms, for level and trimming
BACKGROUND_DB = -15.0  # background speech, relative to the user's speech level
SIDETALK_DB = -8.0  # the user talking to somebody else in the room
MAX_BACKGROUND_S = 6.0  # a television passage is cut to this, with a fade
TAIL_S = 2.5  # silence scripted after a distractor, so a reply to it would be recorded


@dataclass(frozen=True)
class Part:
    """One thing in the user's microphone, started ``delay`` s after ``trigger``
    (the replay triggers: "previous", "agent_start", "agent_end").

    role: turn (a long turn with pauses), request, backchannel, interruption,
    noise, silence. ``audio`` is float32 mono 16 kHz, trimmed to the sound.
    """

    role: str
    text: str  # the words, or a description of the sound
    audio: np.ndarray = field(repr=False, compare=False)
    delay: float = 0.0
    trigger: str = "previous"
    voice: str = ""
    pauses: tuple[tuple[float, float], ...] = ()  # silent gaps inside ``audio``, s from its start

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class Scenario:
    id: str
    category: str
    parts: tuple[Part, ...]
    keywords: tuple[str, ...] = ()  # interruption: the new reply should hold one of these
    kind: str = ""  # noise: cough | door | background | sidetalk
    placement: str = ""  # noise: during | between (as scripted; the scorer checks what happened)

    def script(self):
        from agent.transports.replay import Utterance, UserScript

        return UserScript([Utterance(p.audio, p.delay, p.trigger) for p in self.parts])

    def describe(self) -> dict:
        """JSON-able: everything but the audio."""
        return {"id": self.id, "category": self.category, "keywords": list(self.keywords), "kind": self.kind,
                "placement": self.placement,
                "parts": [{"role": p.role, "text": p.text, "voice": p.voice, "delay": round(p.delay, 3),
                           "trigger": p.trigger, "duration": round(p.duration, 3),
                           "pauses": [[round(a, 3), round(b, 3)] for a, b in p.pauses]} for p in self.parts]}


# -- texts ---------------------------------------------------------------------------------------

def read_lines(name: str) -> list[str]:
    """Non-empty, non-comment lines of a data file."""
    lines = (DATA / name).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def tagged(lines: list[str], tag: str) -> list[str]:
    return [s.split(":", 1)[1].strip() for s in lines if s.startswith(tag + ":")]


# -- voices and levels -----------------------------------------------------------------------------

def frame_rms(x: np.ndarray) -> np.ndarray:
    n = len(x) // FRAME
    return np.sqrt(np.mean(np.square(x[:n * FRAME].reshape(n, FRAME), dtype=np.float64), axis=1))


def active_rms(x: np.ndarray) -> float:
    """RMS over the frames within 30 dB of the loudest: the level of the sound, not of its gaps."""
    r = frame_rms(x)
    if not len(r) or r.max() == 0:
        return 0.0
    loud = r[r > r.max() * 10 ** (-30 / 20)]
    return float(np.sqrt(np.mean(np.square(loud))))


def at_level(x: np.ndarray, rms: float) -> np.ndarray:
    """``x`` scaled to an active level of ``rms``, peaks kept below full scale."""
    level = active_rms(x)
    if level == 0:
        return x.astype(np.float32)
    y = x * (rms / level)
    return (y * min(1.0, 0.95 / max(np.max(np.abs(y)), 1e-9))).astype(np.float32)


def trim(x: np.ndarray, floor_db: float = -40.0) -> np.ndarray:
    """Cut leading and trailing frames quieter than ``floor_db`` below the loudest,
    and a click before the words (``lone_click``)."""
    r = frame_rms(x)
    loud = np.flatnonzero(r > r.max() * 10 ** (floor_db / 20)) if len(r) and r.max() > 0 else []
    if not len(loud):
        return x
    start = loud[0] + lone_click(r[loud[0]:])
    return x[start * FRAME:(loud[-1] + 1) * FRAME]


def lone_click(r: np.ndarray, most_s: float = 0.1, below_db: float = -20.0, gap_s: float = 0.1,
               gap_db: float = -30.0) -> int:
    """Frames (of levels ``r``) of a sound before the words that is no part of them:
    at most ``most_s`` long, ``below_db`` under the loudest throughout, then
    ``gap_s`` of near silence (``gap_db``). flite's kal voice opens "Wait" with
    60 ms of noise 25 dB down, 160 ms before the word; silero took it for the
    start of the user's speech, and stop latencies for 0.2 s longer than the words
    had been there. 0 if the words begin at once."""
    db = 20 * np.log10(r / r.max() + 1e-12)
    most, gap = int(most_s * SAMPLE_RATE / FRAME), int(gap_s * SAMPLE_RATE / FRAME)
    n = int(np.argmax(db < gap_db)) if np.any(db < gap_db) else len(db)
    if n == 0 or n > most or np.any(db[:n] > below_db):
        return 0
    m = n + int(np.argmax(db[n:] >= gap_db)) if np.any(db[n:] >= gap_db) else len(db)
    return m if m - n >= gap and m < len(db) else 0


class Speaker:
    """Text -> speech in one of ``VOICES``; Piper is loaded on first use."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        for tool in ("flite", "espeak-ng"):
            if not shutil.which(tool):
                raise RuntimeError(f"bench duplex needs {tool} (apt-get install {tool}, or scripts/system-deps.sh)")

    @cached_property
    def _piper(self):
        from tts.piper import PiperTTS

        return PiperTTS(self.cache_dir / "piper-joe")

    def say(self, text: str, voice: str) -> np.ndarray:
        """float32 mono 16 kHz at ``SPEECH_RMS``, silence trimmed at both ends."""
        engine, name = voice.split(":")
        if engine == "piper":
            audio = resample(self._piper.synthesize(text), self._piper.sample_rate, SAMPLE_RATE)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "say.wav"
                cmd = (["flite", "-voice", name, "-t", text, "-o", str(path)] if engine == "flite"
                       else ["espeak-ng", "-v", name, "-s", "160", "-w", str(path), text])
                subprocess.run(cmd, check=True, capture_output=True)
                audio = load_audio(path, SAMPLE_RATE)
        return at_level(trim(audio), SPEECH_RMS)


# -- synthesized sounds ----------------------------------------------------------------------------

def _band(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return sosfilt(butter(2, [lo, hi], btype="band", fs=SAMPLE_RATE, output="sos"), x)


def cough(rng: np.random.Generator) -> np.ndarray:
    """Two or three bursts of breathy noise, sharp attack and fast decay, shaped by
    formant-like resonances (about 400, 1400, 2600 Hz) with a little voicing."""
    pieces = []
    for i in range(int(rng.integers(2, 4))):
        n = int(rng.uniform(0.12, 0.25) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        env = np.minimum(1.0, t / rng.uniform(0.005, 0.01)) * np.exp(-t / rng.uniform(0.04, 0.08))
        noise = rng.standard_normal(n)
        f0 = rng.uniform(150, 250)
        buzz = 0.3 * ((t * f0) % 1.0 - 0.5)  # a sawtooth: the vocal folds join in briefly
        src = noise + buzz * np.exp(-t / 0.03) * 4
        shaped = sum(w * _band(src, f * (1 - bw), f * (1 + bw))
                     for f, w, bw in ((400 * rng.uniform(0.85, 1.15), 1.0, 0.35),
                                      (1400 * rng.uniform(0.85, 1.15), 0.7, 0.25),
                                      (2600 * rng.uniform(0.85, 1.15), 0.4, 0.2)))
        pieces += [shaped * env * (0.7 ** i), np.zeros(int(rng.uniform(0.08, 0.2) * SAMPLE_RATE))]
    return at_level(np.concatenate(pieces[:-1]), SPEECH_RMS)


def door_slam(rng: np.random.Generator) -> np.ndarray:
    """A thump (a 60-120 Hz decaying sinusoid and low-passed noise, 15 ms attack,
    about 300 ms decay), then a faint rattle of the frame; peak -3 dBFS."""
    n = int(0.6 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    env = np.minimum(1.0, t / 0.015) * np.exp(-t / rng.uniform(0.08, 0.12))
    low = sosfilt(butter(4, 300, btype="low", fs=SAMPLE_RATE, output="sos"), rng.standard_normal(n))
    thump = env * (np.sin(2 * np.pi * rng.uniform(60, 120) * t) + 0.8 * low / np.std(low))
    rattle = np.zeros(n)
    for k in range(int(rng.integers(2, 5))):
        at = int((rng.uniform(0.08, 0.15) + 0.04 * k) * SAMPLE_RATE)
        m = int(0.02 * SAMPLE_RATE)
        burst = _band(rng.standard_normal(m), 1500, 5000) * np.exp(-np.arange(m) / (0.004 * SAMPLE_RATE))
        rattle[at:at + m] += 0.15 * burst * 0.6 ** k
    x = thump + rattle
    return (x / np.max(np.abs(x)) * 10 ** (-3 / 20)).astype(np.float32)


def next_room(x: np.ndarray, db: float) -> np.ndarray:
    """Speech low-passed at 4 kHz (a set in another room), at ``db`` below the user."""
    y = sosfilt(butter(4, 4000, btype="low", fs=SAMPLE_RATE, output="sos"), x)[:int(MAX_BACKGROUND_S * SAMPLE_RATE)]
    fade = min(len(y), SAMPLE_RATE // 4)
    y[len(y) - fade:] *= np.linspace(1, 0, fade)
    return at_level(y, SPEECH_RMS * 10 ** (db / 20))


# -- the categories --------------------------------------------------------------------------------

def _rng(category: str, i: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(category.encode()), i, seed])


def _voice(category: str, i: int) -> str:
    return VOICES[(i + CATEGORIES.index(category)) % len(VOICES)]


def pause_scenario(i: int, line: str, speaker: Speaker, rng: np.random.Generator) -> Scenario:
    voice = _voice("pause", i)
    pieces, pauses, t = [], [], 0.0
    for k, words in enumerate(s.strip() for s in line.split("|")):
        if k:
            gap = rng.uniform(0.4, 1.0)
            pauses.append((t, t + gap))
            pieces.append(np.zeros(int(round(gap * SAMPLE_RATE)), np.float32))
            t += len(pieces[-1]) / SAMPLE_RATE
        pieces.append(speaker.say(words, voice))
        t += len(pieces[-1]) / SAMPLE_RATE
    text = " ".join(s.strip() for s in line.split("|"))
    return Scenario(f"pause{i:02d}", "pause",
                    (Part("turn", text, np.concatenate(pieces), 0.3, voice=voice, pauses=tuple(pauses)),))


def build(category: str, i: int, speaker: Speaker, seed: int = 0) -> Scenario:
    """Scenario ``i`` of ``category`` (texts are cycled when ``i`` passes their number)."""
    rng = _rng(category, i, seed)
    voice = _voice(category, i)
    if category == "pause":
        lines = read_lines("pause.txt")
        return pause_scenario(i, lines[i % len(lines)], speaker, rng)
    if category == "turntaking":
        lines = read_lines("turntaking.txt")
        q = lines[i % len(lines)]
        return Scenario(f"turntaking{i:02d}", category, (Part("request", q, speaker.say(q, voice), 0.3, voice=voice),))
    if category == "backchannel":
        lines = read_lines("backchannel.txt")
        words = [w.strip() for w in tagged(lines, "bc")[0].split("|")]
        asks = [s for s in lines if not s.startswith("bc:")]
        ask, bc = asks[i % len(asks)], words[i % len(words)]
        return Scenario(f"backchannel{i:02d}", category, (
            Part("request", ask, speaker.say(ask, voice), 0.3, voice=voice),
            Part("backchannel", bc, speaker.say(bc, voice), rng.uniform(1.0, 2.0), "agent_start", voice)))
    if category == "interruption":
        lines = read_lines("interruption.txt")
        ask, cut, keys = (s.strip() for s in lines[i % len(lines)].split("|"))
        return Scenario(f"interruption{i:02d}", category, (
            Part("request", ask, speaker.say(ask, voice), 0.3, voice=voice),
            Part("interruption", cut, speaker.say(cut, voice), rng.uniform(2.0, 4.0), "agent_start", voice)),
            keywords=tuple(k.strip().lower() for k in keys.split(",")))
    if category == "noise":
        return noise_scenario(i, speaker, rng)
    raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")


NOISE_KINDS = ("cough", "door", "background", "sidetalk")


def noise_scenario(i: int, speaker: Speaker, rng: np.random.Generator) -> Scenario:
    lines = read_lines("noise.txt")
    voice = _voice("noise", i)
    other = VOICES[(VOICES.index(voice) + 3) % len(VOICES)]  # somebody else: another voice
    kind = NOISE_KINDS[i % len(NOISE_KINDS)]
    placement = ("during", "between")[(i // len(NOISE_KINDS)) % 2]
    asks = tagged(lines, "long" if placement == "during" else "ask")  # see noise.txt
    ask = asks[i % len(asks)]
    if kind == "cough":
        sound, text, who = cough(rng), "a cough (synthesized: formant-shaped noise bursts)", ""
    elif kind == "door":
        sound, text, who = door_slam(rng), "a door slam (synthesized: low decaying thump and rattle)", ""
    elif kind == "background":
        passages = tagged(lines, "background")
        text, who = passages[i % len(passages)], other
        sound = next_room(speaker.say(text, who), BACKGROUND_DB)
    else:
        sides = tagged(lines, "side")
        text, who = sides[i % len(sides)], other
        sound = at_level(speaker.say(text, who), SPEECH_RMS * 10 ** (SIDETALK_DB / 20))
    if placement == "during":
        delay, trigger = rng.uniform(1.0, 2.0), "agent_start"
    else:
        delay, trigger = rng.uniform(0.5, 1.0), "agent_end"
    return Scenario(f"noise{i:02d}", "noise", (
        Part("request", ask, speaker.say(ask, voice), 0.3, voice=voice),
        Part("noise", text, sound, delay, trigger, who),
        Part("silence", "", np.zeros(int(TAIL_S * SAMPLE_RATE), np.float32))), kind=kind, placement=placement)


def generate(per_category: int, speaker: Speaker, categories: tuple[str, ...] = CATEGORIES,
             seed: int = 0) -> list[Scenario]:
    """``per_category`` scenarios of each category, interleaved (pause00, backchannel00, ...),
    so that a run cut short still covers every category."""
    return [build(c, i, speaker, seed) for i in range(per_category) for c in categories]

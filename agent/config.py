"""One typed configuration for the whole engine.

Every field can be set three ways, the later winning: its default here, an
environment variable ``DUPLEX_<FIELD>`` (e.g. ``DUPLEX_CHUNK_MS=80``), and a CLI flag
``--<field>`` (e.g. ``--chunk-ms 80``). The object is frozen: a session reads it,
nothing changes it at run time.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

SAMPLE_RATE = 16000  # the engine's one internal rate: Whisper's, and webrtcvad's
VAD_FRAME_MS = 20  # webrtcvad takes 10, 20 or 30 ms frames

DEFAULT_SYSTEM_PROMPT = (
    "You are Duplex, a friendly voice assistant in a spoken conversation. "
    "Everything you write is read aloud by a speech synthesizer, so talk the way people talk: "
    "answer in one or two short, plain sentences. "
    "Never use lists, headings, markdown, code, emoji or symbols. "
    "If a question needs a long answer, give the gist and offer to say more."
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "duplex"


@dataclass(frozen=True)
class Config:
    cache_dir: Path = field(default_factory=default_cache_dir, metadata={"help": "model cache directory"})
    chunk_ms: int = field(default=160, metadata={"help": "engine chunk (clock tick) length, 80-320 ms"})
    io_ms: int = field(default=20, metadata={"help": "audio handed to the session and back per call, a multiple of 20 ms that divides chunk_ms: a cut-in holds the voice, and a reply starts, within this much (decisions stay on the chunk clock)"})
    asr_model: str = field(default="tiny.en", metadata={"help": "Whisper model: tiny.en or base"})
    asr_int8: bool = field(default=True, metadata={"help": "Whisper's linear layers in int8 (dynamic quantization): streaming steps about a third cheaper, WER in docs/BENCHMARKS.md (false: float32)"})
    language: str = field(default="en", metadata={"help": "speech language for the multilingual Whisper"})
    llm: str = field(default="qwen2.5-0.5b", metadata={"help": "chat LLM: qwen2.5-0.5b or smollm2-135m"})
    llm_dtype: str = field(default="dual-int8", metadata={"help": "LLM compute: dual (bf16 decode; prefill in bf16 on a CPU with native bf16, else float32), dual-int8 (the same, the reply decoded with int8 weights), bfloat16, float32"})
    tts: str = field(default="piper", metadata={"help": "TTS backend: piper (embedded) or cosyvoice2"})
    tts_model_dir: str = field(default="", metadata={"help": "CosyVoice 2 model directory (cosyvoice2.yaml, llm.pt, ...)"})
    tts_speaker: str = field(default="", metadata={"help": "CosyVoice 2 speaker name (spk2info.pt or registered)"})
    torch_threads: int = field(default=2, metadata={"help": "torch threads for Whisper and the LLM"})
    tts_threads: int = field(default=1, metadata={"help": "onnxruntime threads for the TTS voice"})
    tts_first_threads: int = field(default=2, metadata={"help": "onnxruntime threads for the first group of each reply, while the LLM waits for it (0: as tts_threads)"})
    vad_aggressiveness: int = field(default=2, metadata={"help": "webrtcvad aggressiveness 0-3"})
    speech_start_ms: int = field(default=100, metadata={"help": "voiced audio needed to open a user turn"})
    endpoint_silence_ms: int = field(default=400, metadata={"help": "silence that ends a user turn (with the state head while streaming: that ends a cut-in only)"})
    streaming: bool = field(default=True, metadata={"help": "transcribe while the user speaks and feed the words to the LLM as they come (else: the whole turn once it ends)"})
    speculate_ms: int = field(default=200, metadata={"help": "without streaming: silence after which the reply is computed, unplayed, before the turn is confirmed over (0: off)"})
    statement_gap_ms: int = field(default=1000, metadata={"help": "an answer to a turn that is a statement, not a question or a request, starts only after this much of the user's silence: they may go on (0: off)"})
    max_pause_ms: int = field(default=1500, metadata={"help": "streaming with the state head: silence that ends the user's turn whatever the head says"})
    state_heads: bool = field(default=True, metadata={"help": "let the learned state head judge the end of each user turn and every cut-in (else: silence ends a turn, any cut-in of barge_in_ms stops the agent)"})
    barge_in_ms: int = field(default=400, metadata={"help": "without the state head: user speech that stops the agent mid-reply"})
    cut_in: str = field(default="hold", metadata={"help": "the agent's voice when the user starts talking over it: hold (pause at once, go on where it stopped if the head rejects the cut-in) or duck (12 dB lower until judged)"})
    cut_in_judge_ms: int = field(default=280, metadata={"help": "voiced ms of a cut-in before the state head first judges it (judged by the step; 200 judged at the chunk's end was 200-360)"})
    cut_in_int8: bool = field(default=True, metadata={"help": "the cut-in judge computes the agent's words and the cut-in's through the LLM's int8 decoding copies, on one thread (llm_dtype dual-int8): 3 tokens in 97 ms instead of 204 on a 2-core AVX2 EPYC; on 300 held-out cut-ins 293 verdicts the same, 279 right against 278 (docs/BENCHMARKS.md)"})
    listen_int8: bool = field(default=True, metadata={"help": "the user's words go into the LLM as they are heard through its int8 decoding copies, on every torch thread (llm_dtype dual-int8): 5-10 tokens in 85-103 ms instead of 487-580 on a 2-core AVX2 EPYC; on 300 held-out samples heard while the agent is silent 296 verdicts the same, 286 right either way (docs/BENCHMARKS.md)"})
    hold_max_ms: int = field(default=1500, metadata={"help": "a held voice gives way to a cut-in still talking after this long that the head has not rejected"})
    distant_db: float = field(default=5.0, metadata={"help": "speech this many dB below the user's own voice (measured on the turns answered) is someone else: no hold, no turn (0: off)"})
    max_history_turns: int = field(default=8, metadata={"help": "conversation turns kept for the LLM"})
    max_new_tokens: int = field(default=80, metadata={"help": "longest reply, in LLM tokens"})
    say_again: str = field(default="Sorry, I didn't catch that. Could you say it again?", metadata={"help": "said instead of a reply that holds no words (nothing speakable, or only numbers and punctuation): the user is asked to repeat rather than met with silence ('': silence)"})
    temperature: float = field(default=0.0, metadata={"help": "LLM sampling temperature; 0 is greedy"})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "the agent's system prompt"})

    def __post_init__(self) -> None:
        if not 80 <= self.chunk_ms <= 320 or self.chunk_ms % VAD_FRAME_MS:
            raise ValueError(f"chunk_ms must be a multiple of {VAD_FRAME_MS} in 80..320, got {self.chunk_ms}")
        if self.io_ms <= 0 or self.io_ms % VAD_FRAME_MS or self.chunk_ms % self.io_ms:
            raise ValueError(f"io_ms must be a multiple of {VAD_FRAME_MS} that divides chunk_ms ({self.chunk_ms}), "
                             f"got {self.io_ms}")
        if self.asr_model not in ("tiny.en", "base"):
            raise ValueError(f"asr_model must be 'tiny.en' or 'base', got {self.asr_model!r}")
        if self.llm not in ("qwen2.5-0.5b", "smollm2-135m"):
            raise ValueError(f"llm must be 'qwen2.5-0.5b' or 'smollm2-135m', got {self.llm!r}")
        if self.tts not in ("piper", "cosyvoice2"):
            raise ValueError(f"tts must be 'piper' or 'cosyvoice2', got {self.tts!r}")
        if self.tts == "cosyvoice2" and not self.tts_model_dir:
            raise ValueError("tts cosyvoice2 needs tts_model_dir (--tts-model-dir DIR): its weights are in no package")
        if self.llm_dtype not in ("dual", "dual-int8", "bfloat16", "float32"):
            raise ValueError(f"llm_dtype must be 'dual', 'dual-int8', 'bfloat16' or 'float32', got {self.llm_dtype!r}")
        if self.cut_in not in ("hold", "duck"):
            raise ValueError(f"cut_in must be 'hold' or 'duck', got {self.cut_in!r}")
        if self.distant_db < 0:
            raise ValueError("distant_db must be >= 0 (0: off)")
        if not 0 <= self.vad_aggressiveness <= 3:
            raise ValueError("vad_aggressiveness must be 0..3")

    @property
    def chunk_samples(self) -> int:
        return SAMPLE_RATE * self.chunk_ms // 1000

    @property
    def io_samples(self) -> int:
        return SAMPLE_RATE * self.io_ms // 1000


def _bool(text: str) -> bool:
    """A switch's value as written on a command line or in the environment. Not
    ``bool``: ``bool("false")`` is True, and a switch set to "false" stayed on."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_bool.__name__ = "bool"  # argparse names the type in its error: "invalid bool value: 'maybe'"


def _field_type(f: dataclasses.Field):
    # Annotations are strings under `from __future__ import annotations`.
    return {"int": int, "float": float, "str": str, "Path": Path, "bool": _bool}[str(f.type)]


def config_from(env: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None) -> Config:
    """Defaults, then ``DUPLEX_*`` environment variables, then explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(Config):
        key = "DUPLEX_" + f.name.upper()
        if key in env:
            try:
                values[f.name] = _field_type(f)(env[key])
            except ValueError as e:
                raise ValueError(f"bad value for {key}: {env[key]!r} ({e})") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Config(**values)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Config field; unset flags leave env/defaults in force."""
    group = parser.add_argument_group("engine configuration (also DUPLEX_<NAME> env vars)")
    for f in fields(Config):
        group.add_argument("--" + f.name.replace("_", "-"), type=_field_type(f), default=None,
                           help=f.metadata.get("help"))


def config_from_args(args: argparse.Namespace) -> Config:
    return config_from(overrides={f.name: getattr(args, f.name, None) for f in fields(Config)})

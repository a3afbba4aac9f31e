"""The embedded default voice: Piper (VITS through onnxruntime), the "joe" voice.

Piper makes one audio chunk per sentence and cannot stream inside one, so the
decoder hands it short clause groups (see speech_decoder.pacing); at about 0.1
real-time factor a clause is ready long before the previous one has played.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tts.base import SpeechPiece, TTSBackend

# Piper's per-sentence peak normalisation makes clauses jump in loudness; a fixed
# gain keeps the level steady (VITS output peaks near 0.7 for this voice).
GAIN = 1.0


def _session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Its pool's threads must not spin-wait between syntheses: the LLM needs the core.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class PiperTTS(TTSBackend):
    name = "piper"

    def __init__(self, voice_dir: Path, threads: int = 1, first_threads: int = 0):
        """``threads``: onnxruntime threads (set on purpose: the LLM and Whisper own
        the other core(s)). ``first_threads`` (0: the same): for the first group of
        each ``stream``, the one a listener waits for; the session holds the LLM
        back while it is synthesized (agent/session.py), so it may take every core.
        Measured on the 2-core AMD EPYC, "The capital of France" (1.4 s of speech):
        111 ms on 1 thread, 60 ms on 2."""
        from piper import PiperVoice
        from piper.config import PiperConfig, SynthesisConfig

        voice_dir = Path(voice_dir)
        config = PiperConfig.from_dict(json.loads((voice_dir / "voice.onnx.json").read_text()))
        self._voice = PiperVoice(session=_session(voice_dir / "voice.onnx", threads), config=config)
        self._first_voice = self._voice
        if first_threads and first_threads != threads:
            self._first_voice = PiperVoice(session=_session(voice_dir / "voice.onnx", first_threads), config=config)
        self._syn = SynthesisConfig(normalize_audio=False, volume=GAIN)
        self.sample_rate = config.sample_rate

    def stream(self, text: Iterable[str], cancel: threading.Event) -> Iterator[SpeechPiece]:
        for i, group in enumerate(text):
            if cancel.is_set():
                return
            voice = self._first_voice if i == 0 else self._voice
            for chunk in voice.synthesize(group, self._syn):
                if cancel.is_set():
                    return
                # One chunk per sentence: when a group holds several, the text of
                # each cannot be told apart, so the group's text goes with its last.
                yield SpeechPiece(np.clip(chunk.audio_float_array, -1, 1).astype(np.float32), "")
            yield SpeechPiece(np.zeros(0, np.float32), group)

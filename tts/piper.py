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


class PiperTTS(TTSBackend):
    name = "piper"

    def __init__(self, voice_dir: Path, threads: int = 1):
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig, SynthesisConfig

        voice_dir = Path(voice_dir)
        options = onnxruntime.SessionOptions()
        # Set on purpose: the LLM and Whisper own the other core(s).
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        config = PiperConfig.from_dict(json.loads((voice_dir / "voice.onnx.json").read_text()))
        session = onnxruntime.InferenceSession(str(voice_dir / "voice.onnx"), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        self._voice = PiperVoice(session=session, config=config)
        self._syn = SynthesisConfig(normalize_audio=False, volume=GAIN)
        self.sample_rate = config.sample_rate

    def stream(self, text: Iterable[str], cancel: threading.Event) -> Iterator[SpeechPiece]:
        for group in text:
            if cancel.is_set():
                return
            for chunk in self._voice.synthesize(group, self._syn):
                if cancel.is_set():
                    return
                # One chunk per sentence: when a group holds several, the text of
                # each cannot be told apart, so the group's text goes with its last.
                yield SpeechPiece(np.clip(chunk.audio_float_array, -1, 1).astype(np.float32), "")
            yield SpeechPiece(np.zeros(0, np.float32), group)

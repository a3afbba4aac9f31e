"""Whisper speech recognition of one user utterance (openai-whisper, CPU).

The walking skeleton transcribes each utterance whole once the endpointer has
closed it. Whisper invents text for silence and noise ("Thank you.", "you"), so a
transcript is dropped when Whisper itself thinks there was no speech, or when it
is one of those stock phrases with low confidence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agent.models import int8_linear

# Whisper's typical transcripts of silence, breath and noise (lower-cased, no punctuation).
STOCK_HALLUCINATIONS = frozenset({
    "", "you", "thank you", "thanks for watching", "thank you for watching", "bye", "okay",
    "so", "uh", "um", "hmm", "oh",
})


@dataclass(frozen=True)
class Transcript:
    text: str
    no_speech_prob: float
    avg_logprob: float
    language: str


def _plain(text: str) -> str:
    return re.sub(r"[^\w\s']", "", text).strip().lower()


def is_hallucination(t: Transcript) -> bool:
    if not _plain(t.text):
        return True
    if t.no_speech_prob > 0.6 and t.avg_logprob < -1.0:
        return True
    return _plain(t.text) in STOCK_HALLUCINATIONS and (t.no_speech_prob > 0.2 or t.avg_logprob < -0.7)


def _project_fast(model) -> None:
    """Store the token embedding transposed (its parameter becomes a view of that).

    Every decoded token ends in ``x @ embedding.T`` over the whole [n_vocab, d]
    matrix (51864 x 384 for tiny.en): with that product's right-hand side
    contiguous MKL computes one row about 2.5 times faster on one core (6.2 ->
    2.5 ms per token, measured here); the embedding lookup of a few tokens does
    not care about the layout. Same values, same results."""
    emb = model.decoder.token_embedding
    emb.weight = torch.nn.Parameter(emb.weight.detach().t().contiguous().t(), requires_grad=False)


def quantize_int8(model) -> None:
    """Dynamic int8 quantization of Whisper's linear layers and of the decoder's
    vocabulary projection (weights int8 per output channel, activations quantized
    on the fly), in place. On this CPU a streaming step's encoder and decoder run
    faster (bench/asr.py measures by how much and what it costs in WER); the
    convolutions, attention and layer norms stay float32. The projection is kept
    beside the float embedding as ``decoder.int8_logits`` (tokens are still looked
    up in the float table); speech_encoder.streaming uses it, openai-whisper's own
    forward does not."""
    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, int8_linear(child.weight.detach(), child.bias))
            else:
                swap(child)

    swap(model)
    model.decoder.int8_logits = int8_linear(model.decoder.token_embedding.weight.detach())


class WhisperASR:
    """A converted openai-whisper checkpoint, loaded once and shared."""

    def __init__(self, checkpoint: Path, language: str | None = "en", threads: int = 2, int8: bool = False):
        """``language``: a code such as "en" or "de"; "auto" or None detects it per
        utterance (multilingual models; an English-only model is always "en").
        ``int8``: see ``quantize_int8``."""
        import whisper

        self.threads = threads
        self.model = whisper.load_model(str(checkpoint), device="cpu")
        _project_fast(self.model)
        self.int8 = int8
        if int8:
            quantize_int8(self.model)
        if not self.model.is_multilingual:
            language = "en"
        self.language = None if language in (None, "", "auto") else language

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """``audio``: float32 mono 16 kHz. Blocks; call from the model worker."""
        torch.set_num_threads(self.threads)
        result = self.model.transcribe(
            audio.astype(np.float32), language=self.language, temperature=0.0, fp16=False,
            condition_on_previous_text=False, without_timestamps=True, verbose=None,
        )
        segments = result.get("segments") or []
        nsp = max((s["no_speech_prob"] for s in segments), default=1.0)
        alp = float(np.mean([s["avg_logprob"] for s in segments])) if segments else -10.0
        return Transcript(result["text"].strip(), float(nsp), alp, result.get("language") or "en")

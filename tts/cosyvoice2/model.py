"""``CosyVoice2TTS``: the duplex TTS backend on our CosyVoice 2 inference (SFT bistream).

Per request: a producer thread runs the speech LM over the incoming text (the iterable may
block while the agent's LLM is still writing) and pushes speech tokens into a queue; the
caller's thread turns tokens into audio chunks (``Token2Wav``) as soon as a hop is ready.
The consumer blocks on the queue, so it wakes on the very token that completes a hop (no
sleep-polling); its wait has a short timeout only to notice ``cancel`` while the LM is
itself blocked on text.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..base import SpeechPiece, TTSBackend
from .frontend import build_speaker, require_onnx
from .llm import RasSampler, Sampler, bistream_decode
from .loader import Parts, load_parts
from .speakers import Speaker, UnknownSpeakerError, load_spk2info, save_spk2info
from .stream import Token2Wav

_END = object()
CANCEL_CHECK_S = 0.02  # bound on cancel latency while waiting for tokens


class _NoLock:
    """Stand-in for threading.Lock where no turn-taking is needed (GPU)."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> "_NoLock":
        return self

    def __exit__(self, *exc) -> None:
        return None


class IncrementalTokenizer:
    """Text pieces -> Qwen ids without splitting words across pieces: text is tokenized up to
    the last whitespace seen; the tail waits for the next piece (BPE merges across a space
    boundary are rare, so ids match tokenizing the whole text in practice)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.buf = ""

    def _encode(self, s: str) -> list[int]:
        return list(self.tok.encode(s, add_special_tokens=False)) if s else []

    def feed(self, piece: str) -> list[int]:
        self.buf += piece
        cut = max(self.buf.rfind(" "), self.buf.rfind("\n"))
        if cut <= 0:
            return []
        head, self.buf = self.buf[:cut], self.buf[cut:]
        return self._encode(head)

    def flush(self) -> list[int]:
        head, self.buf = self.buf, ""
        return self._encode(head)


class CosyVoice2TTS(TTSBackend):
    """CosyVoice 2 backend.  ``model_dir`` is an official model directory; ``speaker`` a name
    from its spk2info.pt (or registered later); device cuda-if-available else cpu; dtype
    float16 on GPU by default (bfloat16/float32 selectable), float32 on CPU.

    flow_cache: incremental flow (see stream.py); flow_left_chunks: how many 1 s attention
    chunks of left context the cached flow keeps (4 bounds cost and memory; -1 keeps all,
    which equals upstream's non-final chunks exactly at any length).  seed: fixes sampling
    and vocoder noise (None: random per request).
    """

    name = "cosyvoice2"

    def __init__(self, model_dir: str | Path, speaker: str | None = None, device=None, dtype=None,
                 flow_cache: bool = True, flow_left_chunks: int = 4, seed: int | None = None,
                 max_token_text_ratio: float = 20.0):
        self.model_dir = Path(model_dir)
        self.parts: Parts = load_parts(self.model_dir, device, dtype)
        self.sample_rate = self.parts.cfg.sample_rate
        self.flow_cache, self.flow_left_chunks, self.seed = flow_cache, flow_left_chunks, seed
        # safety cap on speech tokens per text id (upstream's non-streaming default; its
        # bistream mode has none, so an LM that never emits EOS would speak forever)
        self.max_token_text_ratio = max_token_text_ratio
        self.speakers: dict[str, Speaker] = load_spk2info(self.model_dir / "spk2info.pt")
        self.tokenizer = self._load_tokenizer()
        self.speaker = None
        # On CPU the LM thread and the vocoding thread would each start a full intra-op
        # thread pool; on few cores the pools fight (OpenMP spin-waits) and both crawl.  So
        # on CPU they take turns per LM step / per chunk.  On GPU they overlap freely.
        self._compute = threading.Lock() if self.parts.device.type == "cpu" else _NoLock()
        if speaker is not None:
            self.select_speaker(speaker)

    # -- setup ------------------------------------------------------------------------
    def _load_tokenizer(self):
        folder = self.model_dir / "CosyVoice-BlankEN"
        if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            return None  # e.g. the tiny conformance model: use stream_ids with token ids
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder))

    def select_speaker(self, name: str) -> Speaker:
        if name not in self.speakers:
            known = ", ".join(sorted(self.speakers)) or "none"
            raise UnknownSpeakerError(f"unknown CosyVoice 2 speaker {name!r} (known: {known}); "
                                      f"register it with register_speaker()")
        self.speaker = self.speakers[name]
        return self.speaker

    def register_speaker(self, name: str, wav: np.ndarray, sr: int, text: str | Sequence[int]) -> Speaker:
        """Reference clip (mono float) + its transcript (text, or Qwen ids) -> a zero-shot
        speaker, usable at once and saved by ``save_speakers``.  Needs campplus.onnx and
        speech_tokenizer_v2.onnx in the model directory."""
        require_onnx(self.model_dir)
        if isinstance(text, str):
            if self.tokenizer is None:
                raise RuntimeError(f"no Qwen tokenizer in {self.model_dir / 'CosyVoice-BlankEN'}; "
                                   f"pass the transcript as token ids")
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        else:
            ids = [int(i) for i in text]
        spk = build_speaker(self.model_dir, name, wav, sr, ids)
        self.speakers[name] = spk
        return spk

    def save_speakers(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.model_dir / "spk2info.pt"
        save_spk2info(path, self.speakers)
        return path

    def _default_speaker(self) -> Speaker:
        if self.speaker is not None:
            return self.speaker
        # no speaker: a neutral zero x-vector and no prompt (the LM ignores the x-vector)
        return Speaker("", torch.zeros(1, self.parts.cfg.flow.spk_embed_dim))

    # -- synthesis --------------------------------------------------------------------
    def stream(self, text: Iterable[str], cancel: threading.Event) -> Iterator[SpeechPiece]:
        if self.tokenizer is None:
            raise RuntimeError("this model directory has no tokenizer; use stream_ids()")
        tok = IncrementalTokenizer(self.tokenizer)

        def ids() -> Iterator[tuple[list[int], str]]:
            for piece in text:
                yield tok.feed(piece), piece
            yield tok.flush(), ""

        yield from self._stream(ids(), cancel)

    def stream_ids(self, id_pieces: Iterable[Sequence[int]], cancel: threading.Event,
                   sampler: Sampler | None = None) -> Iterator[SpeechPiece]:
        """Lower-level ``stream`` taking Qwen text ids (pieces of any size)."""
        return self._stream(((list(p), "") for p in id_pieces), cancel, sampler)

    def _stream(self, pieces: Iterable[tuple[list[int], str]], cancel: threading.Event,
                sampler: Sampler | None = None) -> Iterator[SpeechPiece]:
        p, spk = self.parts, self._default_speaker()
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,))))
        sampler = sampler or RasSampler(generator=gen)
        hift_gen = torch.Generator(device=p.hift.conv_pre.weight.device)
        hift_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        t2w = Token2Wav(p.flow, p.hift, spk.token_tensor(), spk.feat().to(p.dtype), spk.embedding,
                        flow_cache=self.flow_cache, left_chunks=self.flow_left_chunks, generator=hift_gen)
        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        texts: list[str] = []  # text consumed by the LM so far

        def id_source() -> Iterator[list[int]]:
            # runs inside the LM step, i.e. with the compute turn held: hand the turn back
            # while the text source may block, so vocoding goes on meanwhile
            it = iter(pieces)
            while True:
                self._compute.release()
                try:
                    item = next(it, _END)
                finally:
                    self._compute.acquire()
                if item is _END or stop.is_set() or cancel.is_set():
                    return
                ids, piece = item
                texts.append(piece)
                if ids:
                    yield ids

        def produce() -> None:
            try:
                with torch.inference_mode():
                    tokens = bistream_decode(p.lm, id_source(), sampler, prompt_text=spk.prompt_text,
                                             prompt_speech=spk.prompt_tokens,
                                             max_token_text_ratio=self.max_token_text_ratio)
                    while not (stop.is_set() or cancel.is_set()):
                        with self._compute:  # id_source hands it back while waiting for text
                            tok = next(tokens, None)
                        if tok is None:
                            break
                        q.put((tok, len(texts)))
            except BaseException as e:  # surfaced in the consumer
                q.put(e)
            finally:
                q.put(_END)

        worker = threading.Thread(target=produce, name="cosyvoice2-lm", daemon=True)
        worker.start()
        said = 0
        try:
            while True:
                try:
                    item = q.get(timeout=CANCEL_CHECK_S)
                except queue.Empty:
                    if cancel.is_set():
                        return
                    continue
                if cancel.is_set():
                    return
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                tok, n_text = item
                t2w.push([tok])
                if t2w.ready():
                    with self._compute:
                        audio = t2w.next_chunk()
                    if cancel.is_set():
                        return
                    yield SpeechPiece(audio[0].numpy().astype(np.float32), "".join(texts[said:n_text]))
                    said = n_text
            if not cancel.is_set():
                with self._compute:
                    audio = t2w.final_chunk()
                yield SpeechPiece(audio[0].numpy().astype(np.float32), "".join(texts[said:]))
        finally:
            stop.set()

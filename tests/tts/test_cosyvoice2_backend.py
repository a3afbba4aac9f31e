"""CosyVoice2TTS on the tiny conformance model: streaming behaviour, options and errors.

The tiny model has random weights (its audio is noise) and no tokenizer, so text goes in
as Qwen ids through ``stream_ids``; these tests are about mechanics, not sound.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tts.base import SpeechPiece, TTSBackend
from tts.cosyvoice2 import CosyVoice2TTS, ModelDirError, UnknownSpeakerError
from tts.cosyvoice2.bench import bench_tts
from tts.cosyvoice2.config import parse_hyperpyyaml
from tts.cosyvoice2.speakers import Speaker


def _model_dir() -> Path:
    env = os.environ.get("DUPLEX_SHARED_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared"
    return base / "cosyvoice2-conformance" / "model"


MODEL = _model_dir()
needs_model = pytest.mark.skipif(not MODEL.is_dir(), reason=f"tiny CosyVoice 2 model not found at {MODEL}")


@pytest.fixture(scope="module")
def tts():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads add little, and spin-wait under shared load
    # a short cap keeps runs small: random weights never emit EOS
    yield CosyVoice2TTS(MODEL, seed=0, max_token_text_ratio=4.0)
    torch.set_num_threads(threads)


def test_hyperpyyaml_tags_and_arithmetic_refs_parse():
    y = parse_hyperpyyaml("a: 25\nb: 2\nseed: !apply:torch.manual_seed [1]\n"
                          "m: !new:pkg.Cls\n  x: !ref <a>\n  y: !ref <a> * <b>\n  f: !name:pkg.fn\n"
                          "pipe: [!ref <a>, !ref <b>]\n")
    assert "seed" not in y  # side effects are dropped
    assert y["pipe"] == [25, 2]
    assert y["m"] == {"x": 25, "y": 50, "f": {"_class": "pkg.fn"}, "_class": "pkg.Cls"}


@needs_model
def test_incomplete_model_dir_names_every_missing_file(tmp_path):
    for f in ("cosyvoice2.yaml", "llm.pt"):
        (tmp_path / f).symlink_to(MODEL / f)
    with pytest.raises(ModelDirError) as e:
        CosyVoice2TTS(tmp_path)
    msg = str(e.value)
    assert "flow.pt" in msg and "hift.pt" in msg and "CosyVoice-BlankEN/config.json" in msg
    assert "llm.pt" not in msg.split("missing:")[1]


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        CosyVoice2TTS(tmp_path / "nope")


@needs_model
def test_backend_fits_the_protocol_and_streams_pieces(tts):
    assert isinstance(tts, TTSBackend) and tts.sample_rate == 24000
    pieces = list(tts.stream_ids([[i] for i in range(1, 11)], threading.Event()))
    assert all(isinstance(p, SpeechPiece) and p.audio.dtype == np.float32 for p in pieces)
    sizes = [len(p.audio) for p in pieces]
    # 10 ids * ratio 4 = 40 tokens: hop 25 (+3 lookahead) -> one streamed chunk, then the rest
    assert len(sizes) == 2 and sizes[0] == 25 * 2 * 480 - 3840
    assert sum(sizes) == 40 * 2 * 480
    assert all(np.abs(p.audio).max() <= 0.99 for p in pieces)


@needs_model
def test_same_seed_same_audio_and_hop_restarts_per_request(tts):
    a = [p.audio for p in tts.stream_ids([[3, 4, 5, 6, 7, 8, 9, 10]], threading.Event())]
    b = [p.audio for p in tts.stream_ids([[3, 4, 5, 6, 7, 8, 9, 10]], threading.Event())]
    assert [len(x) for x in a] == [len(x) for x in b]  # upstream would start request 2 at hop 50
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@needs_model
def test_first_audio_arrives_while_text_is_still_coming_and_cancel_is_prompt(tts):
    more_text = threading.Event()
    cancel = threading.Event()

    def text():
        yield from ([i] for i in range(1, 11))  # enough for 30 tokens: one chunk
        more_text.wait(10)  # the agent's LLM is still thinking
        yield [11]

    it = tts.stream_ids(text(), cancel)
    first = next(it)
    assert len(first.audio) > 0 and not more_text.is_set()
    cancel.set()
    t0 = time.perf_counter()
    rest = list(it)
    assert rest == [] and time.perf_counter() - t0 < 0.5
    more_text.set()


@needs_model
def test_unknown_speaker_is_one_clear_error(tts):
    with pytest.raises(UnknownSpeakerError, match="unknown CosyVoice 2 speaker 'bob'"):
        tts.select_speaker("bob")
    with pytest.raises(UnknownSpeakerError):
        CosyVoice2TTS(MODEL, speaker="bob")


@needs_model
def test_speaker_save_load_select_and_use(tts, tmp_path):
    g = torch.Generator().manual_seed(1)
    spk = Speaker("alice", torch.randn(1, 192, generator=g), prompt_text=(5, 6, 7, 8, 9, 10),
                  prompt_tokens=tuple(range(100, 110)), prompt_feat=torch.randn(1, 20, 80, generator=g))
    tts.speakers["alice"] = spk
    path = tts.save_speakers(tmp_path / "spk2info.pt")
    tts.speakers.pop("alice")
    from tts.cosyvoice2.speakers import load_spk2info
    loaded = load_spk2info(path)["alice"]
    assert loaded.prompt_text == spk.prompt_text and loaded.prompt_tokens == spk.prompt_tokens
    assert torch.equal(loaded.embedding, spk.embedding) and torch.equal(loaded.prompt_feat, spk.prompt_feat)
    tts.speakers["alice"] = loaded
    tts.select_speaker("alice")
    try:
        pieces = list(tts.stream_ids([[i] for i in range(1, 16)], threading.Event()))
        # 60 tokens; prompt P = 10: the first hop is padded to 25 + 15 = 40 tokens
        assert len(pieces[0].audio) == 40 * 2 * 480 - 3840
    finally:
        tts.speaker = None


@needs_model
def test_register_speaker_without_onnx_models_names_them(tts):
    with pytest.raises(FileNotFoundError, match="campplus.onnx, speech_tokenizer_v2.onnx"):
        tts.register_speaker("carol", np.zeros(16000, np.float32), 16000, [1, 2, 3])


@needs_model
def test_cpu_refuses_half_precision():
    with pytest.raises(ValueError, match="only supported on GPU"):
        CosyVoice2TTS(MODEL, device="cpu", dtype="float16")


@needs_model
def test_bench_reports_latency_and_rtf(tts):
    r = bench_tts(tts, [list(range(1, 11))], repeats=1)
    assert r["runs"] == 1 and r["total_audio_s"] == pytest.approx(40 * 0.04)
    assert 0 < r["first_chunk_s"]["mean"] <= r["total_synthesis_s"]
    assert r["rtf"]["mean"] > 0


def test_incremental_tokenizer_never_splits_a_word_across_pieces():
    from tts.cosyvoice2.model import IncrementalTokenizer

    seen = []
    tok = IncrementalTokenizer(tokenizer=None)
    tok._encode = lambda s: seen.append(s) or [len(s)]  # record the spans that get encoded
    for piece in ["Hel", "lo wor", "ld, how", " are you"]:
        tok.feed(piece)
    tok.flush()
    assert seen == ["Hello", " world,", " how are", " you"]  # cut at the last space seen
    assert "".join(seen) == "Hello world, how are you"

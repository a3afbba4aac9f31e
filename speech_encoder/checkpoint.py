"""Convert a CTranslate2 Whisper model (``model.bin``) into an openai-whisper checkpoint.

The speech models we ship come as CTranslate2 (faster-whisper) directories, but the
encoder code runs on the ``openai-whisper`` PyTorch modules. This module reads the
CT2 binary format directly (no ``ctranslate2`` dependency) and renames/splits the
weights into the ``{"dims": ..., "model_state_dict": ...}`` dict that
``whisper.load_model(path)`` expects.

CT2 binary layout (version 6, all integers little-endian)::

    u32 version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | data)
    u32 n_aliases
    n_aliases x (str alias | str target)

where ``str`` is ``u16 length`` (counting a trailing NUL) followed by the UTF-8 bytes
and the NUL. ``dtype`` ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16,
5 bfloat16.

Name mapping (CT2 -> openai-whisper), ``N`` = layer index, ``n`` = n_state:

=====================================================  ==========================================
encoder/conv{1,2}/{weight,bias}                        encoder.conv{1,2}.{weight,bias}
encoder/position_encodings/encodings  (1500, n)        encoder.positional_embedding
encoder/layer_N/self_attention/linear_0  (3n, n)       encoder.blocks.N.attn.{query,key,value}
encoder/layer_N/self_attention/linear_1                encoder.blocks.N.attn.out
encoder/layer_N/self_attention/layer_norm              encoder.blocks.N.attn_ln
encoder/layer_N/ffn/linear_{0,1}                       encoder.blocks.N.mlp.{0,2}
encoder/layer_N/ffn/layer_norm                         encoder.blocks.N.mlp_ln
encoder/layer_norm                                     encoder.ln_post
decoder/embeddings/weight  (n_vocab, n)                decoder.token_embedding.weight
decoder/position_encodings/encodings  (448, n)         decoder.positional_embedding
decoder/layer_N/self_attention/...                     decoder.blocks.N.attn / attn_ln (as encoder)
decoder/layer_N/attention/linear_0                     decoder.blocks.N.cross_attn.query
decoder/layer_N/attention/linear_1  (2n, n)            decoder.blocks.N.cross_attn.{key,value}
decoder/layer_N/attention/linear_2                     decoder.blocks.N.cross_attn.out
decoder/layer_N/attention/layer_norm                   decoder.blocks.N.cross_attn_ln
decoder/layer_N/ffn/...                                decoder.blocks.N.mlp.{0,2} / mlp_ln
decoder/layer_norm                                     decoder.ln
decoder/projection/weight (alias of embeddings)        (tied to token_embedding; dropped)
=====================================================  ==========================================

Layer norms are ``gamma``/``beta`` in CT2 and ``weight``/``bias`` in PyTorch.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "read_ct2_model",
    "convert_ct2_whisper",
    "save_checkpoint",
    "alignment_heads_dump",
]

# The only layout version this reader has been checked against (what current
# CTranslate2 writes). Older versions lay the header out differently, so refuse
# them rather than mis-parse.
_SUPPORTED_BINARY_VERSION = 6

_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16 bit patterns; numpy has no bfloat16 (widened on read)
}
_BFLOAT16_ID = 5

# Whisper uses a fixed head size of 64; only used when the file lacks num_heads.
_HEAD_DIM = 64


class _Truncated(Exception):
    """Internal: the buffer ended before a field that the header promised."""


class _Cursor:
    """Sequential little-endian reader over an in-memory buffer."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated(
                f"needed {n} bytes at offset {self.pos}, file has {len(self.buf)}"
            )
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))
        return value

    def string(self) -> str:
        length = self.unpack("H")  # includes the trailing NUL
        raw = bytes(self.take(length))
        if length == 0 or raw[-1] != 0:
            raise ValueError(f"malformed string at offset {self.pos - length}")
        return raw[:-1].decode("utf-8")


def read_ct2_model(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin``.

    Args:
        path: the ``model.bin`` file.

    Returns:
        ``(variables, aliases)``: ``variables`` maps each stored name (e.g.
        ``"encoder/conv1/weight"``) to a numpy array of its stored shape and dtype
        (bfloat16, which numpy lacks, is widened to float32); scalars such as
        ``encoder/num_heads`` are 0-d arrays. Arrays are views into one writable
        buffer holding the whole file (no second copy of the weights).
        ``aliases`` maps alias name -> stored variable name (CT2 stores tied
        weights once, e.g. ``decoder/projection/weight -> decoder/embeddings/weight``).

    Raises:
        ValueError: naming ``path``, if the file is truncated, has trailing bytes,
            an unsupported version, or is not a CT2 model at all.
    """
    variables, aliases, _spec = _load(path)
    return variables, aliases


def _load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """read_ct2_model() plus the spec name (e.g. "WhisperSpec")."""
    path = Path(path)
    size = path.stat().st_size
    buf = bytearray(size)  # writable, so numpy views (and torch.from_numpy) are not read-only
    with open(path, "rb") as f:
        if f.readinto(buf) != size:
            raise ValueError(f"{path}: short read (file changed while reading?)")
    try:
        return _parse(buf)
    except _Truncated as exc:
        raise ValueError(f"{path}: truncated CTranslate2 model file ({exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a valid CTranslate2 model file ({exc})") from None


def _parse(buf: bytearray) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    cur = _Cursor(buf)
    version = cur.unpack("I")
    if version != _SUPPORTED_BINARY_VERSION:
        raise ValueError(
            f"binary version {version}, expected {_SUPPORTED_BINARY_VERSION}"
        )
    spec = cur.string()
    # Spec revision is not checked here: a revision that renames or adds weights
    # is caught by the converter's missing/unmapped-weight checks instead.
    cur.unpack("I")
    n_vars = cur.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(n_vars):
        name = cur.string()
        rank = cur.unpack("B")
        shape = tuple(cur.unpack("I") for _ in range(rank))
        type_id = cur.unpack("B")
        if type_id not in _CT2_DTYPES:
            raise ValueError(f"variable {name!r} has unknown dtype id {type_id}")
        dtype = _CT2_DTYPES[type_id]
        n_bytes = cur.unpack("I")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if n_bytes != expected:
            raise ValueError(
                f"variable {name!r}: {n_bytes} bytes for shape {shape} of {dtype}"
            )
        arr = np.frombuffer(cur.take(n_bytes), dtype=dtype).reshape(shape)
        if type_id == _BFLOAT16_ID:
            # bfloat16 is the top half of a float32: shift the bits back into place.
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        variables[name] = arr
    n_aliases = cur.unpack("I")
    aliases = {}
    for _ in range(n_aliases):
        alias = cur.string()
        aliases[alias] = cur.string()
    if cur.pos != len(buf):
        # Usually a bad concatenation of split parts: fail loudly, not silently.
        raise ValueError(f"{len(buf) - cur.pos} unexpected trailing bytes")
    return variables, aliases, spec


def _as_float16(name: str, arr: np.ndarray) -> torch.Tensor:
    """Copy one float variable to an owned, contiguous float16 tensor."""
    if arr.dtype.kind != "f":
        raise ValueError(
            f"variable {name!r} is {arr.dtype}: quantized (int8/int16) CT2 models "
            "are not supported, convert with float16/float32"
        )
    # clone(): slices of fused qkv would otherwise share (and torch.save would
    # write) the whole fused storage.
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float16)).clone()


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{stack} layers are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def _num_heads(variables: dict[str, np.ndarray], stack: str, n_state: int) -> int:
    stored = variables.get(f"{stack}/num_heads")
    if stored is not None:
        return int(stored)
    return n_state // _HEAD_DIM


def _dims(variables: dict[str, np.ndarray]) -> dict[str, int]:
    conv1 = variables["encoder/conv1/weight"]  # (n_audio_state, n_mels, 3)
    audio_pos = variables["encoder/position_encodings/encodings"]  # (n_audio_ctx, n_audio_state)
    text_pos = variables["decoder/position_encodings/encodings"]  # (n_text_ctx, n_text_state)
    embed = variables["decoder/embeddings/weight"]  # (n_vocab, n_text_state)
    n_audio_state = int(audio_pos.shape[1])
    n_text_state = int(text_pos.shape[1])
    return {
        "n_mels": int(conv1.shape[1]),
        "n_audio_ctx": int(audio_pos.shape[0]),
        "n_audio_state": n_audio_state,
        "n_audio_head": _num_heads(variables, "encoder", n_audio_state),
        "n_audio_layer": _count_layers(variables, "encoder"),
        "n_vocab": int(embed.shape[0]),
        "n_text_ctx": int(text_pos.shape[0]),
        "n_text_state": n_text_state,
        "n_text_head": _num_heads(variables, "decoder", n_text_state),
        "n_text_layer": _count_layers(variables, "decoder"),
    }


def convert_ct2_whisper(model_bin: str | os.PathLike) -> dict:
    """Convert a CTranslate2 Whisper ``model.bin`` into an openai-whisper checkpoint.

    Args:
        model_bin: path of the CT2 ``model.bin`` (float16 or float32 weights;
            int8-quantized models are rejected).

    Returns:
        ``{"dims": {...}, "model_state_dict": {...}}``: ``dims`` holds the ten
        ``whisper.model.ModelDimensions`` fields (ints); ``model_state_dict`` maps
        openai-whisper parameter names to float16 CPU tensors, e.g.
        ``encoder.conv1.weight`` (n_audio_state, n_mels, 3),
        ``decoder.token_embedding.weight`` (n_vocab, n_text_state). It loads with
        ``Whisper(ModelDimensions(**dims)).load_state_dict(sd)`` (strict), or via
        ``whisper.load_model(path)`` after ``save_checkpoint``.

    Raises:
        ValueError: naming the file, if it is unreadable as CT2, is not a
            Whisper spec, or lacks/mis-shapes an expected weight.
    """
    model_bin = Path(model_bin)
    variables, aliases, spec = _load(model_bin)
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin}: CTranslate2 spec {spec!r} is not WhisperSpec")
    try:
        return _convert(variables, aliases)
    except KeyError as exc:
        raise ValueError(
            f"{model_bin}: not a CTranslate2 Whisper model, missing variable {exc}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"{model_bin}: {exc}") from None


def _convert(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> dict:
    dims = _dims(variables)
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        arr = variables[name]
        if arr.shape != shape:
            raise ValueError(f"variable {name!r} has shape {arr.shape}, expected {shape}")
        used.add(name)
        return _as_float16(name, arr)

    def linear(src: str, dst: str, n_out: int, n_in: int) -> None:
        sd[f"{dst}.weight"] = get(f"{src}/weight", (n_out, n_in))
        sd[f"{dst}.bias"] = get(f"{src}/bias", (n_out,))

    def norm(src: str, dst: str, n: int) -> None:
        sd[f"{dst}.weight"] = get(f"{src}/gamma", (n,))
        sd[f"{dst}.bias"] = get(f"{src}/beta", (n,))

    def split_heads(src: str, dst: str, parts: tuple[str, ...], n: int) -> None:
        """Split a fused (len(parts)*n, n) projection into per-part nn.Linear weights."""
        w = get(f"{src}/weight", (len(parts) * n, n))
        b = get(f"{src}/bias", (len(parts) * n,))
        for i, part in enumerate(parts):
            sd[f"{dst}.{part}.weight"] = w[i * n : (i + 1) * n].clone()
            # openai-whisper's key projection has no bias; CT2 stores zeros there.
            # Even a non-zero key bias would add the same constant to every logit
            # of a query row, which softmax ignores, so dropping it is exact.
            if part != "key":
                sd[f"{dst}.{part}.bias"] = b[i * n : (i + 1) * n].clone()

    def block(src: str, dst: str, n: int, cross: bool) -> None:
        split_heads(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"), n)
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out", n, n)
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", n)
        if cross:
            linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query", n, n)
            split_heads(f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"), n)
            linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out", n, n)
            norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", n)
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0", 4 * n, n)
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2", n, 4 * n)
        norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", n)

    na, nt = dims["n_audio_state"], dims["n_text_state"]
    sd["encoder.positional_embedding"] = get(
        "encoder/position_encodings/encodings", (dims["n_audio_ctx"], na)
    )
    sd["encoder.conv1.weight"] = get("encoder/conv1/weight", (na, dims["n_mels"], 3))
    sd["encoder.conv1.bias"] = get("encoder/conv1/bias", (na,))
    sd["encoder.conv2.weight"] = get("encoder/conv2/weight", (na, na, 3))
    sd["encoder.conv2.bias"] = get("encoder/conv2/bias", (na,))
    for i in range(dims["n_audio_layer"]):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", na, cross=False)
    norm("encoder/layer_norm", "encoder.ln_post", na)

    sd["decoder.positional_embedding"] = get(
        "decoder/position_encodings/encodings", (dims["n_text_ctx"], nt)
    )
    sd["decoder.token_embedding.weight"] = get(
        "decoder/embeddings/weight", (dims["n_vocab"], nt)
    )
    for i in range(dims["n_text_layer"]):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", nt, cross=True)
    norm("decoder/layer_norm", "decoder.ln", nt)

    # openai-whisper computes logits with token_embedding.weight (tied). CT2 usually
    # stores the projection as an alias; if it is a real copy it must be identical.
    if "decoder/projection/weight" in variables:
        if not np.array_equal(
            variables["decoder/projection/weight"], variables["decoder/embeddings/weight"]
        ):
            raise ValueError("decoder projection is not tied to the token embedding")
        used.add("decoder/projection/weight")
    elif aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ValueError("decoder projection is neither stored nor aliased to the embedding")

    # Any float tensor we did not map means a layout we do not understand (e.g. a
    # newer spec revision with extra weights): refuse instead of dropping it.
    # Scalars (num_heads, pre_norm, activation, ...) are configuration flags.
    unmapped = sorted(n for n, a in variables.items() if a.ndim > 0 and n not in used)
    if unmapped:
        raise ValueError(f"unmapped weights: {', '.join(unmapped[:5])}")

    # alignment_heads are not part of the checkpoint: whisper.load_model() sets its
    # default mask (last half of decoder layers) for files; see alignment_heads_dump().
    return {"dims": dims, "model_state_dict": sd}


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """Write ``ckpt`` with ``torch.save`` atomically: temp file in the same directory,
    fsync, then ``os.replace``, so readers never see a half-written checkpoint.

    Returns the destination path. Parent directories are created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def alignment_heads_dump(config_json: str | os.PathLike, dims: dict[str, int]) -> bytes:
    """Encode the CT2 ``config.json`` ``alignment_heads`` for ``Whisper.set_alignment_heads``.

    openai-whisper only accepts alignment heads (used for word timestamps) as a
    base85-encoded, gzipped dense bool mask of shape (n_text_layer, n_text_head);
    the CT2 config lists ``[layer, head]`` pairs. Optional: without it, the model
    uses every head of the last half of the decoder layers.
    """
    pairs = json.loads(Path(config_json).read_text())["alignment_heads"]
    mask = np.zeros((dims["n_text_layer"], dims["n_text_head"]), dtype=bool)
    for layer, head in pairs:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))

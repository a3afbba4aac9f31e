"""Load an official CosyVoice 2 model directory into our modules.

Expected layout (``config.REQUIRED_FILES``): cosyvoice2.yaml, llm.pt, flow.pt, hift.pt,
CosyVoice-BlankEN/config.json; optional spk2info.pt, campplus.onnx,
speech_tokenizer_v2.onnx and the Qwen tokenizer files in CosyVoice-BlankEN/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, load_config
from .flow import Flow
from .hift import HiFT
from .llm import SpeechLM
from .weights import fold_weight_norm, load_checkpoint, strip_prefix, to_float32


@dataclass(frozen=True)
class Parts:
    cfg: ModelConfig
    lm: SpeechLM
    flow: Flow
    hift: HiFT
    device: torch.device
    dtype: torch.dtype


def pick_device(device: str | torch.device | None) -> torch.device:
    """None -> cuda if available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> float16 on GPU, float32 on CPU.  Half precision is refused on CPU, where it is
    slow and where the vectors were recorded in float32."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}")
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError("float16/bfloat16 are only supported on GPU; use float32 on CPU")
    return dtype


def load_parts(model_dir: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> Parts:
    """Build LM, flow and HiFT from ``model_dir`` and load their checkpoints strictly.

    The LM and flow run in ``dtype``; HiFT stays float32 (its F0 -> phase integration is
    precision sensitive and it is cheap).
    """
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)  # raises ModelDirError naming missing files
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)

    lm = SpeechLM(cfg.llm, cfg.qwen)
    lm.load_official(load_checkpoint(model_dir / "llm.pt"))
    flow = Flow(cfg.flow)
    flow.load_state_dict(to_float32(load_checkpoint(model_dir / "flow.pt")), strict=True)
    hift = HiFT(cfg.hift)
    hift.load_state_dict(fold_weight_norm(strip_prefix(load_checkpoint(model_dir / "hift.pt"), "generator.")),
                         strict=True)
    for m in (lm, flow, hift):
        m.eval().requires_grad_(False)
    lm.to(device=device, dtype=dtype)
    flow.to(device=device, dtype=dtype)
    flow.noise = flow.noise.float()  # noise stays exact; cast per call
    hift.to(device=device)
    return Parts(cfg, lm, flow, hift, device, dtype)

"""Checkpoint loading helpers shared by the LLM, flow and HiFT parts."""
from __future__ import annotations

from pathlib import Path

import torch


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a state dict on CPU, without unpickling arbitrary objects."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return sd


def fold_weight_norm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs by the plain ``<name>.weight`` they produce.

    Both spellings are accepted: ``parametrizations.weight.original0/1`` (current torch)
    and ``weight_g/weight_v`` (older checkpoints).  The effective weight is g * v / ||v||
    with the norm over all dims but 0; ``torch._weight_norm`` is the very kernel the
    official parametrization calls, so the folded weight is bit-identical to it.
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        for g_name, v_name in ((".parametrizations.weight.original0", ".parametrizations.weight.original1"),
                               (".weight_g", ".weight_v")):
            if k.endswith(g_name):
                pairs.setdefault(k[: -len(g_name)], {})["g"] = v
                break
            if k.endswith(v_name):
                pairs.setdefault(k[: -len(v_name)], {})["v"] = v
                break
        else:
            out[k] = v
    for base, gv in pairs.items():
        if set(gv) != {"g", "v"}:
            raise ValueError(f"incomplete weight-norm pair for {base}")
        g, v = gv["g"].float(), gv["v"].float()
        out[base + ".weight"] = torch._weight_norm(v, g, 0)
    return out


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from keys that carry it (hift.pt may be saved as ``generator.*``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def to_float32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast floating tensors to float32 (flow.pt may store float16); ints stay as they are."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}

"""Speakers: the conditioning a CosyVoice 2 voice needs, stored like upstream spk2info.pt.

A speaker is an x-vector (flow; Qwen2LM ignores it) plus, for zero-shot voices, the prompt:
its text ids, its speech tokens (50 ms each) and its 24 kHz mel (2 frames per token).
SFT-style entries hold only ``embedding``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class UnknownSpeakerError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class Speaker:
    name: str
    embedding: torch.Tensor                   # [1, 192] x-vector (campplus)
    prompt_text: tuple[int, ...] = ()         # Qwen text ids of the reference transcript
    prompt_tokens: tuple[int, ...] = ()       # speech tokens of the reference clip
    prompt_feat: torch.Tensor | None = None   # [1, 2 * len(prompt_tokens), 80] log mel

    def feat(self) -> torch.Tensor:
        return self.prompt_feat if self.prompt_feat is not None else torch.zeros(1, 0, 80)

    def token_tensor(self) -> torch.Tensor:
        return torch.tensor(self.prompt_tokens, dtype=torch.long)[None]

    def to_spk2info(self) -> dict:
        """Upstream zero-shot entry layout (``CosyVoice2.add_zero_shot_spk``)."""
        tok = torch.tensor([self.prompt_tokens], dtype=torch.int32)
        n = torch.tensor([len(self.prompt_tokens)], dtype=torch.int32)
        feat = self.feat()
        return {"prompt_text": torch.tensor([self.prompt_text], dtype=torch.int32),
                "prompt_text_len": torch.tensor([len(self.prompt_text)], dtype=torch.int32),
                "llm_prompt_speech_token": tok, "llm_prompt_speech_token_len": n,
                "flow_prompt_speech_token": tok, "flow_prompt_speech_token_len": n,
                "prompt_speech_feat": feat,
                "prompt_speech_feat_len": torch.tensor([feat.shape[1]], dtype=torch.int32),
                "llm_embedding": self.embedding, "flow_embedding": self.embedding}


def speaker_from_spk2info(name: str, entry: dict) -> Speaker:
    """Accept zero-shot entries (prompt + flow_embedding) and SFT entries (embedding only)."""
    emb = entry.get("flow_embedding", entry.get("embedding"))
    if emb is None:
        raise ValueError(f"speaker {name!r} has no embedding")
    emb = torch.as_tensor(emb).float().reshape(1, -1)

    def ids(key: str) -> tuple[int, ...]:
        t = entry.get(key)
        return tuple(int(i) for i in torch.as_tensor(t).flatten().tolist()) if t is not None else ()

    feat = entry.get("prompt_speech_feat")
    feat = torch.as_tensor(feat).float().reshape(1, -1, 80) if feat is not None and torch.as_tensor(feat).numel() else None
    return Speaker(name, emb, ids("prompt_text"), ids("flow_prompt_speech_token"), feat)


def load_spk2info(path: str | Path) -> dict[str, Speaker]:
    path = Path(path)
    if not path.is_file():
        return {}
    raw = torch.load(str(path), map_location="cpu", weights_only=True)
    return {name: speaker_from_spk2info(name, entry) for name, entry in raw.items()}


def save_spk2info(path: str | Path, speakers: dict[str, Speaker]) -> None:
    """Write speakers in upstream's spk2info.pt layout (loadable by either side)."""
    torch.save({name: spk.to_spk2info() for name, spk in speakers.items()}, str(path))

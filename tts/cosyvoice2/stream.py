"""Streaming token -> waveform driver of CosyVoice 2 (upstream ``CosyVoice2Model.token2wav``
/ ``tts`` stream logic), with per-request state.

Schedule: a chunk is decoded once hop + 3 lookahead tokens beyond ``offset`` exist; the
first hop is 25 plus the prompt padding ceil(P/25)*25 - P (so chunk ends fall on the
flow's 25-token attention chunks); after each chunk the hop doubles up to 100.  When the
tokens end, the rest is decoded as the final chunk.

Vocoder continuity: the last 8 mel frames and 3840 source/speech samples of each chunk are
cached; the next chunk's mel is prefixed with those frames, its first 3840 source samples
are replaced by the cached ones and its first 3840 speech samples are cross-faded with the
cached tail (rising half of hamming(7680) on the new audio, falling half on the old).  All
but the final chunk hold back their last 3840 samples for that.

Differences from upstream, on purpose:
- the hop lives in the request (upstream keeps it on the model, so it never resets);
- ``flow_cache=True`` runs the flow incrementally (``FlowStream``), so a chunk costs the
  same however long the utterance is.  Non-final chunks then equal upstream's (chunk masks
  make earlier frames independent of later tokens).  The final chunk differs: upstream runs
  it with full-context attention over everything, we keep the chunk masks.
  ``flow_cache=False`` recomputes from the start exactly as upstream does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .flow import Flow, FlowStream
from .hift import HiFT

TOKEN_HOP = 25
MAX_HOP = 100
HOP_SCALE = 2
MEL_CACHE = 8  # frames


def crossfade(new: torch.Tensor, old_tail: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """new [1, n], old_tail [1, m], window [2m] -> new with its first m samples replaced by
    new * window[:m] + old_tail * window[m:] (upstream fade_in_out)."""
    m = old_tail.shape[1]
    out = new.clone()
    w = window.to(new.dtype)
    out[:, :m] = new[:, :m] * w[:m] + old_tail * w[m:]
    return out


@dataclass(frozen=True)
class ChunkTrace:
    """What one chunk fed to and got from flow and HiFT (for conformance checks)."""

    flow_mel: torch.Tensor          # flow output; with flow_cache=False the full upstream output
    hift_mel_in: torch.Tensor       # [1, 80, frames] mel given to HiFT
    hift_cache_source: torch.Tensor  # [1, 1, n]
    hift_source: torch.Tensor
    hift_speech_raw: torch.Tensor
    speech: torch.Tensor            # [1, samples] what was yielded


@dataclass
class Token2Wav:
    """Per-request token -> audio state.  Push tokens, pull chunks; not thread-safe."""

    flow: Flow
    hift: HiFT
    prompt_token: torch.Tensor      # [1, P] int
    prompt_feat: torch.Tensor       # [1, 2P, 80]
    embedding: torch.Tensor         # [1, 192]
    flow_cache: bool = True
    left_chunks: int = -1
    generator: torch.Generator | None = None  # HiFT source noise; None = global RNG (upstream)
    record: bool = False            # keep a ChunkTrace per chunk in ``traces``
    tokens: list = field(default_factory=list)
    offset: int = 0
    hop: int = TOKEN_HOP
    traces: list = field(default_factory=list)
    _cache: dict | None = None
    _flow_stream: FlowStream | None = None

    def __post_init__(self) -> None:
        p = self.prompt_token.shape[1]
        self.pad = int(np.ceil(p / TOKEN_HOP) * TOKEN_HOP - p)
        self.lookahead = self.flow.cfg.pre_lookahead_len
        self.window = torch.from_numpy(np.hamming(2 * MEL_CACHE * self.hift.cfg.samples_per_frame))
        if self.flow_cache:
            self._flow_stream = FlowStream(self.flow, self.prompt_token, self.prompt_feat,
                                           self.embedding, self.left_chunks)

    @property
    def this_hop(self) -> int:
        return self.hop + self.pad if self.offset == 0 else self.hop

    def push(self, tokens) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def ready(self) -> bool:
        """True when enough tokens exist for the next non-final chunk."""
        return len(self.tokens) - self.offset >= self.this_hop + self.lookahead

    def _tensor(self, toks: list) -> torch.Tensor:
        return torch.tensor(toks, dtype=torch.long)[None]

    @torch.inference_mode()
    def next_chunk(self) -> torch.Tensor:
        """Decode the next non-final chunk -> speech [1, samples] (call when ready())."""
        hop = self.this_hop
        end = self.offset + hop
        if self.flow_cache:
            mel = self._flow_stream.step(self._tensor(self.tokens[self.offset:end]),
                                         self._tensor(self.tokens[end:end + self.lookahead]))
            full = mel
        else:
            full = self.flow.inference(self._tensor(self.tokens[:end + self.lookahead]), self.prompt_token,
                                       self.prompt_feat, self.embedding, streaming=True, finalize=False)
            mel = full[:, :, self.offset * self.flow.cfg.token_mel_ratio:]
        speech = self._vocode(full, mel, final=False)
        self.offset = end
        self.hop = min(MAX_HOP, self.hop * HOP_SCALE)
        return speech

    @torch.inference_mode()
    def final_chunk(self) -> torch.Tensor:
        """Decode every remaining token and flush -> speech [1, samples]."""
        if self.flow_cache and self.offset > 0:
            mel = self._flow_stream.step(self._tensor(self.tokens[self.offset:]), None)
            full = mel
        elif not self.tokens:
            full = mel = torch.zeros(1, self.flow.cfg.output_size, 0)
        else:
            # upstream's last call: finalize=True and, not passing stream, full context.  With
            # flow_cache this path serves single-chunk (offline or short) requests: one pass.
            full = self.flow.inference(self._tensor(self.tokens), self.prompt_token, self.prompt_feat,
                                       self.embedding, streaming=False, finalize=True)
            mel = full[:, :, self.offset * self.flow.cfg.token_mel_ratio:]
        self.offset = len(self.tokens)
        return self._vocode(full, mel, final=True)

    def _vocode(self, flow_mel: torch.Tensor, mel: torch.Tensor, final: bool) -> torch.Tensor:
        n_src = MEL_CACHE * self.hift.cfg.samples_per_frame
        mel = mel.to(self.hift.conv_pre.weight.dtype)
        if self._cache is not None:
            mel = torch.cat([self._cache["mel"].to(mel), mel], dim=2)
            cache_source = self._cache["source"]
        else:
            cache_source = torch.zeros(1, 1, 0, device=mel.device, dtype=mel.dtype)
        if mel.shape[2] == 0:
            speech_raw = torch.zeros(1, 0, device=mel.device)
            source = torch.zeros(1, 1, 0, device=mel.device)
        else:
            speech_raw, source = self.hift.inference(mel, cache_source=cache_source, generator=self.generator)
        speech = speech_raw.float().cpu()
        if self._cache is not None and speech.shape[1] >= n_src:
            speech = crossfade(speech, self._cache["speech"], self.window)
        elif self._cache is not None and final:
            speech = self._cache["speech"]  # nothing new: release the held-back tail as is
        if not final:
            self._cache = {"mel": mel[:, :, -MEL_CACHE:], "source": source[:, :, -n_src:],
                           "speech": speech[:, -n_src:]}
            speech = speech[:, :-n_src]
        if self.record:
            self.traces.append(ChunkTrace(flow_mel.float().cpu(), mel.float().cpu(),
                                          cache_source.float().cpu(), source.float().cpu(),
                                          speech_raw.float().cpu(), speech))
        return speech

    def run(self, tokens, stream: bool = True):
        """Upstream ``tts`` over a complete token list: yields speech [1, samples] chunks."""
        self.push(tokens)
        if stream:
            while self.ready():
                yield self.next_chunk()
        yield self.final_chunk()

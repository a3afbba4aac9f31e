"""Chunk-aware causal flow matching of CosyVoice 2: speech tokens -> 80-bin mel at 50 Hz.

tokens (prompt first) -> embedding -> UpsampleConformerEncoder -> encoder_proj = mu
[1, 80, 2N]; then a 10-step Euler ODE from fixed noise with a cosine time schedule and
classifier-free guidance (batch of 2: conditional, and zero mu/spks/cond), the prompt mel
as condition on its frames, the L2-normalised x-vector projected to 80 dims as speaker.

Two ways to run it:
- ``Flow.inference``: the official call, recomputing everything from the first token.
- ``FlowStream``: per-request incremental state (our improvement).  Each call encodes only
  the new tokens and integrates only their frames, reusing encoder/estimator caches, so a
  chunk's cost does not grow with utterance length (with ``left_chunks`` >= 0 attention
  also only looks back that many chunks; -1 looks at everything, still cached).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FlowConfig
from .flow_decoder import Estimator, EstimatorCache
from .flow_encoder import EncoderCache, UpsampleConformerEncoder

N_TIMESTEPS = 10          # hard-coded in the official flow.inference
NOISE_FRAMES = 50 * 300   # upstream draws randn(1, 80, 15000) once: 300 s of mel frames
NOISE_SEED = 0


def cfm_noise(mel_bins: int = 80, frames: int = NOISE_FRAMES, seed: int = NOISE_SEED) -> torch.Tensor:
    """The fixed CFM start noise [1, mel_bins, frames]: upstream seeds torch with 0 and draws
    randn once at construction.  A private generator gives the same numbers on CPU without
    touching the global RNG."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, mel_bins, frames, generator=g)


def t_schedule(n: int, scheduler: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """n+1 times from 0 to 1; cosine: 1 - cos(t * pi/2) (denser steps near t = 0)."""
    t = torch.linspace(0, 1, n + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi) if scheduler == "cosine" else t


class CFMDecoder(nn.Module):
    """Holds the estimator under the official ``decoder.estimator`` name."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.estimator = Estimator(cfg)


class Flow(nn.Module):
    """CausalMaskedDiffWithXvec (inference).  Parameter names follow flow.pt."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(
            cfg.input_size, cfg.enc_heads, cfg.enc_linear_units, cfg.enc_num_blocks,
            cfg.enc_chunk_size, cfg.pre_lookahead_len)
        self.encoder_proj = nn.Linear(cfg.input_size, cfg.output_size)
        self.decoder = CFMDecoder(cfg)
        self.register_buffer("noise", cfm_noise(cfg.output_size), persistent=False)

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """x-vector [1, 192] -> [1, 80] (L2-normalised first)."""
        w = self.spk_embed_affine_layer.weight
        return self.spk_embed_affine_layer(F.normalize(embedding.to(device=w.device, dtype=w.dtype), dim=1))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.input_embedding(tokens.clamp(min=0).long())

    def noise_frames(self, start: int, n: int) -> torch.Tensor:
        """Frames [start, start+n) of the fixed noise; past 300 s it wraps around (upstream
        would fail there)."""
        idx = torch.arange(start, start + n, device=self.noise.device) % self.noise.shape[2]
        return self.noise[:, :, idx]

    def solve(self, mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, z: torch.Tensor,
              streaming: bool, caches: list[EstimatorCache] | None = None,
              left_chunks: int = -1) -> torch.Tensor:
        """Euler ODE with CFG.  mu, cond, z [1, 80, T]; spks [1, 80] -> mel [1, 80, T].

        caches: one EstimatorCache per Euler step for incremental calls (else None).
        """
        cfg = self.cfg
        t_span = t_schedule(N_TIMESTEPS, cfg.t_scheduler, mu.device, mu.dtype)
        zeros = torch.zeros_like
        mu2 = torch.cat([mu, zeros(mu)])         # second half: unconditional branch
        spks2 = torch.cat([spks, zeros(spks)])
        cond2 = torch.cat([cond, zeros(cond)])
        x = z
        # same accumulation of t and dt as upstream, so times match bit for bit
        t, dt = t_span[0:1], t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            v = self.decoder.estimator(
                torch.cat([x, x]), mu2, t.expand(2), spks2, cond2, streaming,
                cache=None if caches is None else caches[step - 1], left_chunks=left_chunks)
            v_cond, v_uncond = v[:1], v[1:]
            x = x + dt * ((1.0 + cfg.cfg_rate) * v_cond - cfg.cfg_rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool, finalize: bool,
                  return_mu: bool = False):
        """Official flow.inference.  token [1, N], prompt_token [1, P], prompt_feat
        [1, 2P, 80], embedding [1, 192] -> mel [1, 80, frames] without prompt frames.

        finalize=False holds back the last pre_lookahead_len tokens as lookahead context,
        so frames = 2 * (P + N - 3) - 2P.  return_mu also gives mu [1, 80, all frames].
        """
        dev = self.noise.device
        tokens = torch.cat([prompt_token.to(token), token], dim=1).to(dev)
        x = self.embed(tokens)
        if finalize:
            h = self.encoder(x, streaming=streaming)
        else:
            la = self.cfg.pre_lookahead_len
            h = self.encoder(x[:, :-la], context=x[:, -la:], streaming=streaming)
        mu = self.encoder_proj(h).transpose(1, 2)
        n_prompt = prompt_feat.shape[1]
        cond = torch.zeros_like(mu)
        cond[:, :, :n_prompt] = prompt_feat.transpose(1, 2).to(mu)
        z = self.noise_frames(0, mu.shape[2]).to(mu.dtype)
        mel = self.solve(mu, self.speaker(embedding), cond, z, streaming)
        mel = mel[:, :, n_prompt:].float()
        return (mel, mu) if return_mu else mel


@dataclass
class FlowStream:
    """Incremental flow state of one request (see module doc).

    Feed tokens in order with ``step``; every call must end on an encoder chunk boundary
    (a multiple of the 25-token chunk counted from the first prompt token) unless it is the
    last one, so chunk masks line up with the official streaming calls.
    """

    flow: Flow
    prompt_token: torch.Tensor      # [1, P]
    prompt_feat: torch.Tensor       # [1, 2P, 80]
    embedding: torch.Tensor         # [1, 192]
    left_chunks: int = -1
    enc: EncoderCache = field(default_factory=EncoderCache)
    est: list = field(default_factory=lambda: [EstimatorCache() for _ in range(N_TIMESTEPS)])
    frames: int = 0                 # mel frames produced so far, prompt included

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, lookahead: torch.Tensor | None) -> torch.Tensor:
        """tokens [1, n] new speech tokens; lookahead [1, 3] the following tokens (None for
        the last call: zero padding, like finalize=True) -> mel [1, 80, 2n] for them."""
        flow = self.flow
        device = flow.noise.device
        first = self.enc.length == 0
        toks = tokens.to(device)
        if first:
            toks = torch.cat([self.prompt_token.to(device).to(toks.dtype), toks], dim=1)
        if toks.shape[1] == 0:
            return torch.zeros(1, flow.cfg.output_size, 0, device=device)
        ctx = flow.embed(lookahead.to(device)) if lookahead is not None else None
        h = flow.encoder(flow.embed(toks), context=ctx, streaming=True, cache=self.enc,
                         left_chunks=self.left_chunks)
        mu = flow.encoder_proj(h).transpose(1, 2)
        n = mu.shape[2]
        cond = torch.zeros_like(mu)
        n_prompt = self.prompt_feat.shape[1]
        if first and n_prompt:
            cond[:, :, :n_prompt] = self.prompt_feat.transpose(1, 2).to(mu)
        z = flow.noise_frames(self.frames, n).to(mu.dtype)
        mel = flow.solve(mu, flow.speaker(self.embedding), cond, z, True,
                         caches=self.est, left_chunks=self.left_chunks)
        self.frames += n
        return (mel[:, :, n_prompt:] if first else mel).float()

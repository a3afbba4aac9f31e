"""Flow-matching estimator of CosyVoice 2: CausalConditionalDecoder (Matcha U-Net, 1 level).

Input per call: x, mu, cond [B, 80, T] and spks [B, 80], t [B] -> velocity [B, 80, T].
Everything is causal in time except self-attention, which sees whole 50-frame chunks
(all left chunks, or ``left_chunks`` of them) when streaming, else the full sequence.

Incremental use: pass an ``EstimatorCache``; the call then covers only the frames after
those already seen (absolute start ``cache.length``).  Causal convs keep their last k-1
input frames, attention keeps keys/values.  With unlimited left chunks the result equals a
chunk-masked recompute from the start (up to float rounding), because nothing before a
chunk boundary depends on what comes after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FlowConfig
from .flow_encoder import cached_kv


@dataclass
class EstimatorCache:
    """Per-request, per-Euler-step state of one estimator: conv tails and attention K/V
    keyed by module, plus how many frames it has seen (``length``)."""

    length: int = 0
    tails: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)


def attention_mask(q_start: int, q_len: int, k_start: int, k_len: int, chunk: int, left_chunks: int,
                   device: torch.device) -> torch.Tensor | None:
    """Bool [q_len, k_len] for absolute query/key positions: a query in chunk c sees keys
    in chunks [c - left_chunks, c] (all left chunks if left_chunks < 0).  chunk <= 0 means
    full context (None)."""
    if chunk <= 0:
        return None
    qi = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kj = torch.arange(k_start, k_start + k_len, device=device)[None, :]
    m = kj < (qi // chunk + 1) * chunk
    if left_chunks >= 0:
        m &= kj >= (qi // chunk - left_chunks) * chunk
    return m


class CausalConv(nn.Conv1d):
    """Conv1d left-padded by k-1 (zeros at the utterance start, cached frames later)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, k)

    def forward(self, x: torch.Tensor, cache: EstimatorCache | None = None) -> torch.Tensor:
        pad = self.kernel_size[0] - 1
        if cache is None:
            return super().forward(F.pad(x, (pad, 0)))
        tail = cache.tails.get(id(self))
        if tail is None:
            tail = x.new_zeros(x.shape[0], x.shape[1], pad)
        x = torch.cat([tail, x], dim=2)
        cache.tails[id(self)] = x[:, :, -pad:]
        return super().forward(x)


class CausalBlock(nn.Module):
    """CausalConv k3 -> LayerNorm over channels -> Mish.  ``block.0``/``block.2`` names."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.ModuleList([CausalConv(cin, cout, 3), nn.Identity(), nn.LayerNorm(cout)])

    def forward(self, x: torch.Tensor, cache: EstimatorCache | None) -> torch.Tensor:
        h = self.block[0](x, cache)
        h = self.block[2](h.transpose(1, 2)).transpose(1, 2)
        return F.mish(h)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, t_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(t_dim, cout))
        self.block1 = CausalBlock(cin, cout)
        self.block2 = CausalBlock(cout, cout)
        self.res_conv = nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cache: EstimatorCache | None) -> torch.Tensor:
        h = self.block1(x, cache) + self.mlp(t)[:, :, None]
        return self.block2(h, cache) + self.res_conv(x)


class Attention(nn.Module):
    """diffusers-style self-attention: to_q/to_k/to_v without bias, to_out.0 with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, q_start: int, chunk: int, left_chunks: int,
                cache: EstimatorCache | None) -> torch.Tensor:
        """x [B, n, C] for absolute frames [q_start, q_start + n)."""
        b, n, _ = x.shape
        split = lambda y: y.view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        k_start = q_start
        if cache is not None:
            k, v, k_start = cached_kv(cache.kv, id(self), k, v, q_start, n, chunk, left_chunks)
        mask = attention_mask(q_start, n, k_start, k.shape[2], chunk, left_chunks, x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class TransformerBlock(nn.Module):
    """Matcha BasicTransformerBlock (self-attention only): x + attn(LN x); x + FF(LN x)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor, q_start: int, chunk: int, left_chunks: int,
                cache: EstimatorCache | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), q_start, chunk, left_chunks, cache)
        h = self.norm3(x)
        for m in self.ff.net:
            h = m(h)
        return x + h


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of t [B] -> [B, dim] (Matcha SinusoidalPosEmb: sin | cos)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    arg = scale * t[:, None] * freq[None]
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class Estimator(nn.Module):
    """CausalConditionalDecoder restricted to one U-Net level (both official CosyVoice 2
    configs use ``channels: [256]``/one entry, where down/up samplers are causal convs)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        if len(cfg.dec_channels) != 1:
            raise NotImplementedError("estimator with more than one U-Net level")
        ch = cfg.dec_channels[0]
        self.in_channels, self.chunk = cfg.dec_in_channels, cfg.dec_chunk_size
        t_dim = ch * 4
        self.time_mlp = nn.Module()
        self.time_mlp.linear_1 = nn.Linear(cfg.dec_in_channels, t_dim)
        self.time_mlp.linear_2 = nn.Linear(t_dim, t_dim)

        def transformers() -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(ch, cfg.dec_num_heads, cfg.dec_head_dim)
                                 for _ in range(cfg.dec_n_blocks))
        self.down_blocks = nn.ModuleList([nn.ModuleList(
            [ResnetBlock(cfg.dec_in_channels, ch, t_dim), transformers(), CausalConv(ch, ch, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([ResnetBlock(ch, ch, t_dim), transformers()])
                                        for _ in range(cfg.dec_num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList(
            [ResnetBlock(2 * ch, ch, t_dim), transformers(), CausalConv(ch, ch, 3)])])
        self.final_block = CausalBlock(ch, ch)
        self.final_proj = nn.Conv1d(ch, cfg.dec_out_channels, 1)

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, streaming: bool, cache: EstimatorCache | None = None,
                left_chunks: int = -1) -> torch.Tensor:
        """x, mu, cond [B, 80, n]; t [B]; spks [B, 80] -> velocity [B, 80, n].

        With ``cache`` the n frames are absolute frames [cache.length, cache.length + n).
        """
        start = cache.length if cache is not None else 0
        chunk = self.chunk if streaming else 0
        temb = self.time_mlp.linear_2(F.silu(self.time_mlp.linear_1(
            timestep_embedding(t, self.in_channels).to(t.dtype))))
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[2]), cond], dim=1)

        def attend(h: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
            h = h.transpose(1, 2)
            for blk in blocks:
                h = blk(h, start, chunk, left_chunks, cache)
            return h.transpose(1, 2)

        resnet, blocks, down = self.down_blocks[0]
        h = attend(resnet(h, temb, cache), blocks)
        skip = h
        h = down(h, cache)
        for resnet, blocks in self.mid_blocks:
            h = attend(resnet(h, temb, cache), blocks)
        resnet, blocks, up = self.up_blocks[0]
        h = attend(resnet(torch.cat([h, skip], dim=1), temb, cache), blocks)
        h = up(h, cache)
        out = self.final_proj(self.final_block(h, cache))
        if cache is not None:
            cache.length += x.shape[2]
        return out

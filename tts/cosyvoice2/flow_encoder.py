"""Token encoder of the CosyVoice 2 flow: UpsampleConformerEncoder (inference only).

tokens [1, N, 512] (embedded) -> PreLookaheadLayer -> conformer stack (rel-pos attention,
chunk size 25 tokens when streaming) -> 2x nearest upsample + causal conv -> second
embedding -> 4 conformer layers (chunk size 50 frames) -> LayerNorm: [1, 2N, 512].

Module names follow the official encoder so the ``encoder.*`` keys of flow.pt load
strictly.  Dropouts are omitted (inference), as are the unused macaron / conv modules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


def rel_pos_rows(hi: int, lo: int, d_model: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ESPnet relative position encodings [hi - lo + 1, d] for offsets hi, hi-1, ..., lo
    (offset = query position - key position).  Offset k >= 0 gives sin/cos(k w), negative
    offsets sin/cos(-k w): the same rows as upstream's precomputed table, by construction."""
    off = torch.arange(hi, lo - 1, -1, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(off.shape[0], d_model)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(off * div), torch.cos(off * div)
    return pe.to(device=device, dtype=dtype)


def cached_kv(kv: dict, key: int, k: torch.Tensor, v: torch.Tensor, q_start: int, n: int, chunk: int,
              left_chunks: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Join this call's keys/values [B, H, n, d] to the ones cached under ``key``, and
    cache back only those that later queries (from q_start + n on) may attend to
    (chunk masks with ``left_chunks`` of left context; all if < 0).
    Returns (keys, values, absolute position of the first key)."""
    k_start = q_start
    old = kv.get(key)
    if old is not None:
        k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        k_start = q_start - old[0].shape[2]
    cut = 0
    if chunk > 0 and left_chunks >= 0:
        cut = max(0, max(0, ((q_start + n) // chunk - left_chunks) * chunk) - k_start)
    kv[key] = (k[:, :, cut:], v[:, :, cut:])
    return k, v, k_start


@dataclass
class EncoderCache:
    """Per-request state of the token encoder: how many tokens it has encoded, the last
    embedded tokens (left context of the lookahead conv), the last first-stack outputs
    (left context of the upsampling conv) and attention keys/values per layer."""

    length: int = 0
    emb_tail: torch.Tensor | None = None
    up_tail: torch.Tensor | None = None
    kv: dict = field(default_factory=dict)


class LinearEmbed(nn.Module):
    """LinearNoSubsampling: Linear -> LayerNorm, then x * sqrt(d) (rel-pos encoding)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.scale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class RelPosAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (ESPnet flavour)."""

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, 2T-1] scores per relative offset -> [B, H, T, T] per key position
        (the pad-and-reshape trick; identical arithmetic to upstream)."""
        b, h, t, n = x.shape
        padded = torch.cat([x.new_zeros(b, h, t, 1), x], dim=-1).view(b, h, n + 1, t)
        return padded[:, :, 1:].reshape(b, h, t, n)[:, :, :, : n // 2 + 1]

    def forward(self, x: torch.Tensor, q_start: int, chunk: int, left_chunks: int,
                cache: EncoderCache | None = None) -> torch.Tensor:
        """x [B, n, D] at absolute positions [q_start, q_start + n) -> [B, n, D].

        chunk <= 0: full context; else a query sees its own chunk and left_chunks chunks
        before it (all if < 0).  With a cache, keys/values of earlier positions are reused.
        """
        b, n, _ = x.shape
        q = self.linear_q(x).view(b, n, self.h, self.d_k)
        k = self.linear_k(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(b, n, self.h, self.d_k).transpose(1, 2)
        k_start = q_start
        if cache is not None:
            k, v, k_start = cached_kv(cache.kv, id(self), k, v, q_start, n, chunk, left_chunks)
        m = k.shape[2]
        # position term: one row per relative offset, gathered per (query, key) pair; this
        # is what upstream's rel_shift trick computes, generalised to a query window
        hi, lo = q_start + n - 1 - k_start, q_start - (k_start + m - 1)
        pos = self.linear_pos(rel_pos_rows(hi, lo, self.h * self.d_k, x.device, x.dtype))
        pos = pos.view(-1, self.h, self.d_k).transpose(0, 1)  # [H, R, d_k]
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), pos.transpose(-2, -1)[None])
        qi = torch.arange(q_start, q_start + n, device=x.device)[:, None]
        kj = torch.arange(k_start, k_start + m, device=x.device)[None, :]
        bd = torch.gather(bd, 3, (hi - (qi - kj)).expand(b, self.h, n, m))
        scores = (ac + bd) / math.sqrt(self.d_k)
        if chunk > 0:
            mask = kj < (qi // chunk + 1) * chunk
            if left_chunks >= 0:
                mask = mask & (kj >= (qi // chunk - left_chunks) * chunk)
            scores = scores.masked_fill(~mask, -float("inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(d, hidden)
        self.w_2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: x + MHA(LN(x)); x + FFN(LN(x)).  (No macaron/conv module in CV2.)"""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = RelPosAttention(heads, d)
        self.feed_forward = FeedForward(d, hidden)
        self.norm_mha = nn.LayerNorm(d, eps=1e-12)
        self.norm_ff = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x: torch.Tensor, q_start: int, chunk: int, left_chunks: int,
                cache: EncoderCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), q_start, chunk, left_chunks, cache)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """Residual conv that lets each token see ``lookahead`` future tokens:
    right-pad (with context tokens, else zeros), conv k=L+1, leaky ReLU, causal conv k=3."""

    def __init__(self, d: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(d, d, lookahead + 1)
        self.conv2 = nn.Conv1d(d, d, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D]; context [B, <=L, D] embedded future tokens or None -> [B, T, D]."""
        h = x.transpose(1, 2)
        n_ctx = 0
        if context is not None and context.shape[1]:
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
            n_ctx = context.shape[1]
        h = F.pad(h, (0, self.lookahead - n_ctx))
        h = F.leaky_relu(self.conv1(h))
        h = self.conv2(F.pad(h, (2, 0)))
        return h.transpose(1, 2) + x


class Upsample(nn.Module):
    """Nearest upsample by ``stride`` then a left-padded (causal) conv, k = 2*stride+1."""

    def __init__(self, d: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(d, d, stride * 2 + 1)

    def forward(self, x: torch.Tensor, has_left: bool = False) -> torch.Tensor:
        """x [B, D, T] -> [B, D, stride*T].  has_left: the first ``stride`` columns of x are
        cached left context; upsampled they are exactly the 2*stride frames the conv reaches
        back, so they replace the zero padding (output then covers T - stride tokens)."""
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(x if has_left else F.pad(x, (self.stride * 2, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, num_blocks: int, chunk_size: int,
                 lookahead: int, num_up_blocks: int = 4, stride: int = 2):
        super().__init__()
        self.chunk_size = chunk_size
        self.embed = LinearEmbed(d, d)
        self.pre_lookahead_layer = PreLookahead(d, lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(d, heads, hidden) for _ in range(num_blocks))
        self.up_layer = Upsample(d, stride)
        self.up_embed = LinearEmbed(d, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(d, heads, hidden) for _ in range(num_up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, xs: torch.Tensor, context: torch.Tensor | None = None,
                streaming: bool = False, cache: EncoderCache | None = None,
                left_chunks: int = -1) -> torch.Tensor:
        """xs [1, N, D] embedded tokens; context [1, <=3, D] embedded lookahead tokens that
        the lookahead conv sees but that produce no output -> [1, 2N, D].

        streaming=True uses static chunk masks (chunk_size tokens, then 2*chunk_size frames,
        left_chunks of left context, all if < 0); False uses full context (upstream's last
        chunk and offline calls).  With ``cache`` xs holds only the tokens after the
        cache.length already encoded, and the output covers only their frames.
        """
        stride = self.up_layer.stride
        start = cache.length if cache is not None else 0
        chunk = self.chunk_size if streaming else 0
        x = self.embed(xs)
        ctx = self.embed(context) if context is not None and context.shape[1] else None
        n_left = 0
        if cache is not None:
            left = cache.emb_tail if cache.emb_tail is not None else x[:, :0]
            n_left = left.shape[1]
            x_ext = torch.cat([left, x], dim=1)
            cache.emb_tail = x_ext[:, -2:]  # conv2 of the lookahead layer reaches 2 back
            x = self.pre_lookahead_layer(x_ext, ctx)[:, n_left:]
        else:
            x = self.pre_lookahead_layer(x, ctx)
        for layer in self.encoders:
            x = layer(x, start, chunk, left_chunks, cache)
        h = x.transpose(1, 2)
        if cache is not None:
            # the upsampling conv reaches 2*stride frames back, i.e. `stride` tokens
            tail = cache.up_tail if cache.up_tail is not None else h.new_zeros(h.shape[0], h.shape[1], stride)
            h_ext = torch.cat([tail, h], dim=2)
            cache.up_tail = h_ext[:, :, -stride:]
            h = self.up_layer(h_ext, has_left=True)
        else:
            h = self.up_layer(h)
        x = self.up_embed(h.transpose(1, 2))
        for layer in self.up_encoders:
            x = layer(x, start * stride, chunk * stride, left_chunks, cache)
        if cache is not None:
            cache.length += xs.shape[1]
        return self.after_norm(x)

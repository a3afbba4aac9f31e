"""HiFT vocoder of CosyVoice 2: mel -> F0 -> harmonic source -> iSTFT waveform.

Shapes: mel [B, 80, T] (T mel frames at 50 Hz); F0 [B, T] in Hz; source [B, 1, T*480];
speech [B, T*480] at 24 kHz.  Module/attribute names follow the official HiFTGenerator
so ``hift.pt`` loads strictly once its weight-norm pairs are folded (weights.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import HiFTConfig


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, alpha per channel (linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        # the 1e-9 guards a zero alpha, as upstream does
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


class ResBlock(nn.Module):
    """Three (Snake, dilated conv, Snake, conv) residual units; length preserving."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d,
                                              padding=(kernel * d - d) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + c2(a2(c1(a1(x))))
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: 5 x (conv k3, ELU), linear, |.|.  mel [B, C, T] -> F0 [B, T] Hz."""

    def __init__(self, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


@dataclass(frozen=True)
class SourceNoise:
    """The random numbers one source generation consumes (for reproducible tests).

    rand_ini: [B, H] initial phases (column 0 is forced to 0); randn: [B, L, H] unit
    normals scaled into the additive noise.  H = nb_harmonics + 1, L = samples.
    """

    rand_ini: torch.Tensor
    randn: torch.Tensor


def draw_source_noise(batch: int, length: int, harmonics: int, device: torch.device,
                      generator: torch.Generator | None = None) -> SourceNoise:
    """Draw the source randomness in upstream's order and memory layout.

    Upstream draws ``rand(B, H)``, then ``randn_like`` of a [B, L, H] tensor whose memory is
    [B, H, L] transposed (CPU normal_ fills non-contiguous tensors along another path than
    ``randn(B, L, H)``), then one [B, L, 1] normal for an unused noise branch.  Doing the same
    here makes ``torch.manual_seed(s)`` runs reproduce the official waveform bit for bit.
    """
    rand_ini = torch.rand(batch, harmonics, device=device, generator=generator)
    randn = torch.empty(batch, harmonics, length, device=device).transpose(1, 2)
    randn.normal_(generator=generator)
    torch.empty(batch, length, 1, device=device).normal_(generator=generator)  # RNG advance only
    return SourceNoise(rand_ini, randn)


class SourceModule(nn.Module):
    """SourceModuleHnNSF with SineGen2 (non-causal): F0 per sample -> source excitation."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def sines(self, f0: torch.Tensor, noise: SourceNoise) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, L, 1] Hz per sample -> (noisy harmonics [B, L, H], uv [B, L, 1])."""
        cfg, up = self.cfg, self.cfg.samples_per_frame
        harm = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
        rad = (f0 * harm / cfg.sampling_rate) % 1  # cycles per sample, integer part is irrelevant
        ini = noise.rand_ini.to(rad).clone()
        ini[:, 0] = 0  # the fundamental starts at phase 0
        rad = rad.clone()
        rad[:, 0, :] = rad[:, 0, :] + ini
        # integrate the phase at frame rate then interpolate back: cheaper and smoother than a
        # per-sample cumsum (upstream's SineGen2 behaviour, reproduced step for step)
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / up, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * math.pi
        phase = F.interpolate(phase.transpose(1, 2) * up, scale_factor=up, mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        uv = (f0 > cfg.nsf_voiced_threshold).to(f0.dtype)
        amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        return sines * uv + amp * noise.randn.to(sines), uv

    def forward(self, f0: torch.Tensor, noise: SourceNoise) -> torch.Tensor:
        """f0 [B, L, 1] -> source [B, L, 1] in (-1, 1)."""
        s, _ = self.sines(f0, noise)
        return torch.tanh(self.l_linear(s))


class HiFT(nn.Module):
    """HiFTGenerator (NSF + iSTFTNet) with the official parameter names."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        self.m_source = SourceModule(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, ch, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch // 2 ** i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # source branch i meets the x branch after upsample i, so it downsamples the source
        # STFT (hop_len frames) by the product of the remaining upsample rates
        rates = [1] + list(cfg.upsample_rates[::-1][:-1])
        cum = np.cumprod(rates)[::-1]
        stft_ch = cfg.n_fft + 2
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes)):
            out = ch // 2 ** (i + 1)
            u = int(u)
            self.source_downs.append(nn.Conv1d(stft_ch, out, 1) if u == 1 else
                                     nn.Conv1d(stft_ch, out, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(out, k, tuple(d)))
        self.resblocks = nn.ModuleList(
            ResBlock(ch // 2 ** (i + 1), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(ch // 2 ** len(self.ups), stft_ch, 7, padding=3)
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        # scipy.signal.get_window("hann", n, fftbins=True) is the periodic Hann window
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False)

    # -- parts -----------------------------------------------------------------------
    def source(self, mel: torch.Tensor, noise: SourceNoise | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """mel [B, 80, T] -> source [B, 1, T*480].  Draws noise unless given."""
        f0 = self.f0_predictor(mel)
        f0_up = f0.repeat_interleave(self.cfg.samples_per_frame, dim=1)[:, :, None]  # nearest
        if noise is None:
            noise = draw_source_noise(f0.shape[0], f0_up.shape[1], self.cfg.nb_harmonics + 1,
                                      mel.device, generator)
        return self.m_source(f0_up, noise).transpose(1, 2)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T], source [B, 1, T*480] -> speech [B, T*480] clamped to audio_limit."""
        cfg = self.cfg
        spec = torch.stft(source.squeeze(1).float(), cfg.n_fft, cfg.hop_len, cfg.n_fft,
                          window=self.window, return_complex=True)
        s_stft = torch.cat([spec.real, spec.imag], dim=1).to(mel.dtype)
        x = self.conv_pre(mel)
        nk = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # aligns x with the STFT frame count
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as upstream
        half = cfg.n_fft // 2 + 1
        mag = torch.exp(x[:, :half]).clamp(max=1e2).float()
        phase = torch.sin(x[:, half:]).float()  # upstream applies sin to the phase logits
        wav = torch.istft(torch.complex(mag * torch.cos(phase), mag * torch.sin(phase)),
                          cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.window)
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None,
                  noise: SourceNoise | None = None, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, 80, T] -> (speech [B, T*480], source [B, 1, T*480]).

        cache_source [B, 1, n]: the previous chunk's last source samples; they replace the
        first n new ones so the excitation is continuous across chunk boundaries.
        """
        s = self.source(mel, noise, generator)
        if cache_source is not None and cache_source.shape[2] > 0:
            s = s.clone()
            s[:, :, : cache_source.shape[2]] = cache_source.to(s)
        return self.decode(mel, s), s

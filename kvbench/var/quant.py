"""VAR's multi-scale residual VQ and the VQVAE around it (FoundationVision/VAR ``models/quant.py``, ``vqvae.py``).

Our own code with the checkpoint's names: ``quantize.embedding.weight`` (V, Cvae), the buffer
``quantize.ema_vocab_hit_SV`` (S, V) and the shared Phi convs ``quantize.quant_resi.qresi_ls.{k}`` (k < 4 for the
released ``share_quant_resi=4``; ``quant_resi.{k}`` when not shared, ``quant_resi.qresi`` when fully shared).

Inference path only: the token map of scale si (B, Cvae, pn, pn) is upsampled bicubically to the last scale's
size, passed through Phi(si / (S-1)) (``x (1 - r) + conv(x) r``, r = 0.5) and added to ``f_hat``; the next
scale's input is ``f_hat`` area-downsampled to the next size. The last scale is added without interpolation.
``f_to_tokens`` (encoder side, nearest-codebook residual quantisation) is used by the tiny model's builder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvbench.var.vae import Decoder, Encoder


@dataclass(frozen=True)
class VAEConfig:
    """VQVAE hyperparameters; the defaults are ``vae_ch160v4096z32.pth``'s (``build_vae_var``)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Phi(nn.Conv2d):
    """3x3 conv with a residual mix: ``x (1 - r) + conv(x) r``."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, x: Tensor) -> Tensor:
        return x * (1 - self.ratio) + super().forward(x) * self.ratio


def phi_ticks(k: int) -> np.ndarray:
    """Where the k Phi convs sit on [0, 1]: the authors' ticks (1/3K margins for K = 4, else 1/2K)."""
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    return np.linspace(margin, 1 - margin, k)


class PhiPartiallyShared(nn.Module):
    """K shared Phi convs; scale ratio t in [0, 1] uses the nearest tick."""

    def __init__(self, convs: list[Phi]) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(convs)
        self.ticks = phi_ticks(len(convs))

    def __getitem__(self, t: float) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - t)))]


class PhiNonShared(nn.ModuleList):
    """One Phi per scale (``share_quant_resi=0``), picked by the nearest tick like the shared variant."""

    def __init__(self, convs: list[Phi]) -> None:
        super().__init__(convs)
        self.ticks = phi_ticks(len(convs))

    def __getitem__(self, t: float) -> Phi:  # type: ignore[override]
        return super().__getitem__(int(np.argmin(np.abs(self.ticks - t))))


class PhiShared(nn.Module):
    def __init__(self, conv: Phi) -> None:
        super().__init__()
        self.qresi = conv

    def __getitem__(self, t: float) -> Phi:
        return self.qresi


def make_phi(cfg: VAEConfig) -> nn.Module:
    convs = [Phi(cfg.z_channels, cfg.quant_resi) for _ in range(cfg.share_quant_resi or len(cfg.patch_nums))]
    if cfg.share_quant_resi == 1:
        return PhiShared(convs[0])
    return PhiNonShared(convs) if cfg.share_quant_resi == 0 else PhiPartiallyShared(convs)


class MultiScaleVQ(nn.Module):
    """The residual multi-scale quantiser (the checkpoint's ``VectorQuantizer2``), inference only."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.quant_resi = make_phi(cfg)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def phi(self, si: int) -> Phi:
        return self.quant_resi[si / (len(self.cfg.patch_nums) - 1)]

    def add_scale(self, si: int, f_hat: Tensor, h: Tensor) -> Tensor:
        """f_hat (B, Cvae, P, P) += Phi(upsampled token map h (B, Cvae, pn, pn)), in place; returns f_hat."""
        full = self.cfg.patch_nums[-1]
        if si != len(self.cfg.patch_nums) - 1:
            h = F.interpolate(h, size=(full, full), mode="bicubic")
        return f_hat.add_(self.phi(si)(h))

    def next_input(self, si: int, f_hat: Tensor) -> Tensor:
        """The next scale's input map: f_hat area-downsampled to (B, Cvae, pn_{si+1}, pn_{si+1})."""
        pn = self.cfg.patch_nums[si + 1]
        return F.interpolate(f_hat, size=(pn, pn), mode="area")

    def f_to_tokens(self, f: Tensor) -> list[Tensor]:
        """Encoder features (B, Cvae, P, P) -> per-scale token ids [(B, pn^2)] by residual nearest-code search."""
        rest, f_hat, out = f.clone(), torch.zeros_like(f), []
        last = len(self.cfg.patch_nums) - 1
        for si, pn in enumerate(self.cfg.patch_nums):
            z = F.interpolate(rest, size=(pn, pn), mode="area") if si != last else rest
            z = z.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B pn pn, Cvae)
            idx = torch.cdist(z, self.embedding.weight).argmin(1).view(f.shape[0], pn, pn)
            h = self.embedding(idx).permute(0, 3, 1, 2)  # (B, Cvae, pn, pn)
            before = f_hat.clone()
            self.add_scale(si, f_hat, h)
            rest -= f_hat - before
            out.append(idx.reshape(f.shape[0], -1))
        return out


class VQVAE(nn.Module):
    """``encoder``, ``quant_conv``, ``quantize``, ``post_quant_conv``, ``decoder``: the checkpoint's top level."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kw = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels)
        self.encoder, self.decoder = Encoder(**kw), Decoder(**kw)
        self.quantize = MultiScaleVQ(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    def fhat_to_img(self, f_hat: Tensor) -> Tensor:
        """(B, Cvae, P, P) -> image (B, 3, P * down, P * down) in [0, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1).add(1).mul(0.5)

    def img_to_tokens(self, img: Tensor) -> list[Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> per-scale token ids."""
        return self.quantize.f_to_tokens(self.quant_conv(self.encoder(img)))

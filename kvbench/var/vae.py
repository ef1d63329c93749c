"""The VQGAN-style conv encoder/decoder of VAR's VQVAE (FoundationVision/VAR ``models/basic_vae.py``, MIT).

Our own code with the released checkpoint's module names (``encoder.down.0.block.1.conv1.weight`` ...), so
``vae_ch160v4096z32.pth`` loads strictly. ``ch_mult`` and ``num_res_blocks`` are parameters (the released VQVAE:
ch 160, ch_mult (1, 1, 2, 2, 4), 2 blocks, self-attention at the lowest resolution and in the middle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) as in latent-diffusion's ``Normalize``: channels must be a multiple of 32."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, cin, h, w) -> (B, cout, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 ``qkv`` conv and a residual ``proj_out``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w)
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # each (B, C, hw)
        att = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=-1)  # (B, hw_q, hw_k)
        out = (v @ att.transpose(1, 2)).view(b, c, h, w)  # (B, C, hw_q)
        return x + self.proj_out(out)


class Upsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return level


def _middle(channels: int, attention: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latent (B, z, H / 2^(levels-1), W / 2^(levels-1))."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 using_sa: bool = True, using_mid_sa: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin, last = ch, len(ch_mult) - 1
        for i, mult in enumerate(ch_mult):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * mult))
                cin = ch * mult
                if i == last and using_sa:
                    attn.append(AttnBlock(cin))
            level = _level(blocks, attn)
            if i != last:
                level.downsample = Downsample2x(cin)
            self.down.append(level)
        self.mid = _middle(cin, using_mid_sa)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                h = level.attn[j](h) if len(level.attn) else h
            h = level.downsample(h) if i != len(self.down) - 1 else h
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h * 2^(levels-1), w * 2^(levels-1)); ``up`` is indexed low to high
    resolution-level as in the checkpoint (``up.0`` is the last one applied)."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 using_sa: bool = True, using_mid_sa: bool = True, out_channels: int = 3) -> None:
        super().__init__()
        cin, last = ch * ch_mult[-1], len(ch_mult) - 1
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = _middle(cin, using_mid_sa)
        levels: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
                if i == last and using_sa:
                    attn.append(AttnBlock(cin))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = Upsample2x(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, out_channels, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                h = level.attn[j](h) if len(level.attn) else h
            h = level.upsample(h) if i != 0 else h
        return self.conv_out(F.silu(self.norm_out(h)))

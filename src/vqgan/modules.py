"""Encoder / decoder building blocks with taming-transformers' parameter names.

Module attribute names (conv_in, down.{i}.block.{j}.norm1, mid.attn_1, up.{i}.upsample.conv, ...) are chosen so that
`state_dict()` keys equal taming's `VQModel` keys exactly; the code itself is written for speed on CPU and GPU:
channels_last-friendly ops only, SDPA attention, in-place activations/residuals when no graph is recorded.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VQGANConfig


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    # In-place saves a full-resolution buffer per call; only safe when autograd is not recording.
    return F.silu(x, inplace=not torch.is_grad_enabled())


def add_residual(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + h, reusing h's buffer when no graph is recorded (h is a fresh activation)."""
    return x + h if torch.is_grad_enabled() else h.add_(x)


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = conv1x1(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return add_residual(x, h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; 1x1 convs for q/k/v/proj_out (taming's layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = conv1x1(channels, channels)
        self.k = conv1x1(channels, channels)
        self.v = conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        # b c h w -> b 1 (h w) c: a view for channels_last tensors; SDPA's default scale is c**-0.5, as taming's.
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return add_residual(x, self.proj_out(h))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads right/bottom only, so a symmetric conv padding would shift the sampling grid by one pixel
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, each followed by attention when the level has it, then a resampler."""

    def __init__(self, blocks: List[ResnetBlock], attns: List[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int, dropout: float, attention: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        if attention:
            self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.block_1(h)
        if hasattr(self, "attn_1"):
            h = self.attn_1(h)
        return self.block_2(h)


def encoder_attn_levels(cfg: VQGANConfig) -> List[bool]:
    """Which encoder levels hold attention: taming halves `resolution` once per level."""
    res, out = cfg.resolution, []
    for _ in cfg.ch_mult:
        out.append(res in cfg.attn_resolutions)
        res //= 2
    return out


def decoder_attn_levels(cfg: VQGANConfig) -> List[bool]:
    """Which decoder levels (indexed like `up.{i}`) hold attention: taming doubles from resolution // f upwards."""
    n = len(cfg.ch_mult)
    bottom = cfg.resolution // 2 ** (n - 1)
    return [bottom * 2 ** (n - 1 - i) in cfg.attn_resolutions for i in range(n)]


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = conv3x3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, (c_out, has_attn) in enumerate(zip(widths, encoder_attn_levels(cfg))):
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks)]
            c_in = c_out
            level = Level(blocks, [AttnBlock(c_out) for _ in blocks] if has_attn else [])
            if i != len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = Middle(c_in, cfg.dropout, cfg.mid_attention)
        self.norm_out = normalize(c_in)
        self.conv_out = conv3x3(c_in, cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))  # [B, z_channels, H/f, W/f]


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = conv3x3(cfg.z_channels, c_in)
        self.mid = Middle(c_in, cfg.dropout, cfg.mid_attention)
        levels = []
        attn_levels = decoder_attn_levels(cfg)
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            # num_res_blocks + 1 blocks per level (taming's decoder mirrors the encoder's skip count)
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks + 1)]
            c_in = c_out
            level = Level(blocks, [AttnBlock(c_out) for _ in blocks] if attn_levels[i] else [])
            if i != 0:
                level.upsample = Upsample(c_out)
            levels.insert(0, level)  # stored as up.0 (full resolution) .. up.{n-1} (lowest), run in reverse
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(c_in)
        self.conv_out = conv3x3(c_in, cfg.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, ch*ch_mult[-1], h, w]
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))  # [B, out_ch, H, W]

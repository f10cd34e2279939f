"""The Inception mixer of iFormer (Inception Transformer, NeurIPS 2022; sail-sg/iFormer), on (B, C, H, W) maps.

The channels are split: the FIRST ``high_dim`` channels go to the high-frequency mixer, the LAST ``low_dim`` channels
(``attention_head * head_dim``) to the low-frequency mixer (attention). Inside the high-frequency mixer the FIRST half
takes the conv path (1x1 conv x2 channels, no bias -> depthwise 3x3, no bias -> GELU) and the second half the max-pool
path (maxpool 3x3 s1 -> 1x1 conv x2 channels, with bias -> GELU): this is what the official code does (the paper
draws the two paths the other way round). The outputs ``[conv, pool, attention]`` (2 * high_dim + low_dim channels)
are fused by a residual depthwise 3x3 conv (no bias) and projected back to ``dim`` by a 1x1 conv with bias.

Differences from the official module, none of which changes outputs where the official code runs:

* the attention output is reshaped to the real pooled (h, w) instead of ``(sqrt(N), sqrt(N))`` (the official code only
  runs on square maps);
* the 2x2 average pooling of stages 1-2 uses ``ceil_mode`` (border windows average only the pixels inside) and the
  nearest-neighbour upsampling is cropped back to (H, W), so odd feature maps work (the official code needs input
  sizes that are multiples of 16); on even maps both are exactly the official ops.

Parameter names (``high_mixer.conv1/proj1/proj2``, ``low_mixer.qkv``, ``conv_fuse``, ``proj``) are the official ones.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_mixer

__all__ = ["HighMixer", "LowMixer", "InceptionMixer"]

# default share of attention (low-frequency) heads per stage when the mixer is used outside iFormer; iFormer-S ramps
# 1/3, 1/2, 0.7 -> 0.9, 0.92 over its stages
_DEFAULT_LOW_RATIO = (1 / 3, 1 / 2, 0.75, 0.9)


class HighMixer(nn.Module):
    """High-frequency mixer: conv path on the first half of the channels, max-pool path on the second half."""

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.cnn_in = cnn_in = dim // 2
        self.pool_in = pool_in = dim // 2
        self.cnn_dim = cnn_dim = cnn_in * 2
        self.pool_dim = pool_dim = pool_in * 2
        self.conv1 = nn.Conv2d(cnn_in, cnn_dim, kernel_size=1, bias=False)
        self.proj1 = nn.Conv2d(cnn_dim, cnn_dim, kernel_size, stride=stride, padding=padding, bias=False,
                               groups=cnn_dim)
        self.mid_gelu1 = nn.GELU()
        self.Maxpool = nn.MaxPool2d(kernel_size, stride=stride, padding=padding)
        self.proj2 = nn.Conv2d(pool_in, pool_dim, kernel_size=1, bias=True)
        self.mid_gelu2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cx = self.mid_gelu1(self.proj1(self.conv1(x[:, :self.cnn_in])))
        px = self.mid_gelu2(self.proj2(self.Maxpool(x[:, self.cnn_in:])))
        return torch.cat((cx, px), dim=1)


class LowMixer(nn.Module):
    """Low-frequency mixer: (avg-pool) -> multi-head self-attention (qkv Linear, no output projection) -> (upsample)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 pool_size: int = 2):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.dim = dim
        self.pool_size = pool_size
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.pool = nn.AvgPool2d(pool_size, stride=pool_size, padding=0, ceil_mode=True,
                                 count_include_pad=False) if pool_size > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        xa = self.pool(x)
        h, w = xa.shape[-2], xa.shape[-1]
        xa = xa.flatten(2).transpose(1, 2)  # B, N, C (row-major tokens, as the official NHWC view)
        N = xa.shape[1]
        qkv = self.qkv(xa).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        xa = (attn @ v).transpose(2, 3).reshape(B, self.dim, h, w)
        if self.pool_size > 1:
            xa = F.interpolate(xa, scale_factor=float(self.pool_size), mode="nearest")[:, :, :H, :W]
        return xa


@register_mixer("inception")
class InceptionMixer(nn.Module):
    """iFormer's Inception token mixer, (B, C, H, W) -> (B, C, H, W).

    Args:
        dim: channels.
        num_heads: total heads of the block (``head_dim = dim // num_heads``); default ``dim // 32``.
        attention_head: heads given to the low-frequency (attention) path, ``low_dim = attention_head * head_dim``;
            the remaining ``dim - low_dim`` channels go to the high-frequency path. Default: a per-stage share
            (``low_ratio`` or 1/3, 1/2, 3/4, 0.9 of the heads for stages 1-4).
        pool_size: down/up-pooling around the attention (official: 2 in stages 1-2, 1 in stages 3-4); default from
            ``stage_idx`` (2 for the first two stages, else 1).
        qkv_bias, attn_drop, proj_drop: as the official module (iFormer uses qkv_bias=True and never wires proj_drop).
    """

    def __init__(self, dim: int, num_heads: Optional[int] = None, attention_head: Optional[int] = None,
                 pool_size: Optional[int] = None, qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 low_ratio: Optional[float] = None, stage_idx: Optional[int] = None, head_dim: int = 32):
        super().__init__()
        if num_heads is None:
            num_heads = max(1, dim // head_dim)
        head_dim = dim // num_heads
        if attention_head is None:
            if low_ratio is None:
                low_ratio = _DEFAULT_LOW_RATIO[min(stage_idx, 3)] if stage_idx is not None else 0.5
            attention_head = min(max(1, round(num_heads * low_ratio)), max(1, num_heads - 1))
        if pool_size is None:
            pool_size = 2 if stage_idx is not None and stage_idx < 2 else 1
        self.num_heads = num_heads
        self.low_dim = low_dim = attention_head * head_dim
        self.high_dim = high_dim = dim - low_dim
        if high_dim <= 0 or high_dim % 2 or low_dim <= 0:
            raise ValueError(
                f"InceptionMixer(dim={dim}, num_heads={num_heads}, attention_head={attention_head}) splits the "
                f"channels into high_dim={high_dim} / low_dim={low_dim}; both must be positive and high_dim even. "
                f"Choose attention_head < num_heads (head_dim = dim // num_heads = {head_dim}).")
        self.high_mixer = HighMixer(high_dim)
        self.low_mixer = LowMixer(low_dim, num_heads=attention_head, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                  pool_size=pool_size)
        fuse_dim = low_dim + high_dim * 2
        self.conv_fuse = nn.Conv2d(fuse_dim, fuse_dim, kernel_size=3, padding=1, bias=False, groups=fuse_dim)
        self.proj = nn.Conv2d(fuse_dim, dim, kernel_size=1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hx = self.high_mixer(x[:, :self.high_dim])
        lx = self.low_mixer(x[:, self.high_dim:])
        x = torch.cat((hx, lx), dim=1)
        x = x + self.conv_fuse(x)
        return self.proj_drop(self.proj(x))

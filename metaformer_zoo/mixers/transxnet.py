"""TransXNet's D-Mixer (TransXNet, TNNLS 2025, arXiv 2310.19380; LMMMEng/TransXNet), on (B, C, H, W) maps.

``DMixer`` (official ``HybridTokenMixer``): the channels are halved with ``torch.chunk``; the FIRST half goes through
IDConv (``DynamicConv2d``: an input-dependent depthwise KxK conv whose kernel and bias are softmax-weighted mixtures of
G learned ones) and the SECOND half through OSRA (``OSRAttention``: overlapping spatial-reduction attention with an
optional relative position bias); the halves are concatenated and refined by the residual STE
``x + proj(x)`` (dw3x3 -> GELU -> BN -> 1x1 -> GELU -> BN -> 1x1 -> BN).

Parameter names follow the official code (mmcv ``ConvModule`` keys ``conv`` / ``bn``), so official checkpoints load
after a prefix remapping. Deviation (training only): the official IDConv runs its kernel generator's BatchNorm on the
(B, C, 1, 1) global mean for the bias, which raises at batch size 1 in training mode; here that single call uses the
BatchNorm's running statistics (without updating them) when the batch has one sample. Eval outputs and training at
batch >= 2 are the official ones.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_notrace_function, register_notrace_module

from . import register_mixer

__all__ = ["ConvBN", "DynamicConv2d", "OSRAttention", "DMixer", "resize_rel_pos"]


class ConvBN(nn.Module):
    """mmcv ``ConvModule`` equivalent (conv -> BN -> optional activation) with its key names ``conv``/``bn``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, act: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.activate = nn.GELU() if act else nn.Identity()
        # a depthwise 1x1 conv is a per-channel scale; PyTorch's CPU conv runs it through a very slow per-group path
        self.dw_pointwise = kernel_size == 1 and groups == in_chs == out_chs and stride == 1 and padding == 0

    def forward(self, x):
        if self.dw_pointwise:
            x = x * self.conv.weight.view(1, -1, 1, 1)  # same values as the conv, up to float rounding
        else:
            x = self.conv(x)
        return self.activate(self.bn(x))


@register_notrace_function
def resize_rel_pos(rel_pos: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Official rule: the (1, heads, Nq, Nk) bias is resized as a 2-D image of size Nq x Nk (bicubic,
    align_corners False) whenever the attention shape differs. Not a spatial resize, but what the weights expect."""
    if rel_pos.shape[-2] == q_len and rel_pos.shape[-1] == k_len:
        return rel_pos
    return F.interpolate(rel_pos, size=(q_len, k_len), mode="bicubic", align_corners=False)


@register_notrace_module  # batch-size dependent control flow: a leaf for FX
class DynamicConv2d(nn.Module):
    """IDConv: per-sample depthwise KxK conv, kernel/bias = softmax over G of learned kernels/biases.

    The softmax weights come from ``proj`` (1x1 conv C -> C//r, BN, GELU, 1x1 conv -> G*C) applied to the
    ``AdaptiveAvgPool2d(K)`` map (kernel) and to the global mean (bias), with the same ``proj``.
    """

    no_weight_decay_keys = ("weight", "bias")

    def __init__(self, dim: int, kernel_size: int = 3, reduction_ratio: int = 4, num_groups: int = 2,
                 bias: bool = True):
        super().__init__()
        if num_groups < 2:
            raise ValueError(f"IDConv needs num_groups >= 2 kernels to mix, got {num_groups}")
        self.num_groups = num_groups
        self.K = kernel_size
        self.weight = nn.Parameter(torch.empty(num_groups, dim, kernel_size, kernel_size))
        self.pool = nn.AdaptiveAvgPool2d(output_size=(kernel_size, kernel_size))
        self.proj = nn.Sequential(
            ConvBN(dim, dim // reduction_ratio, kernel_size=1, act=True),
            nn.Conv2d(dim // reduction_ratio, dim * num_groups, kernel_size=1),
        )
        self.bias = nn.Parameter(torch.empty(num_groups, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.trunc_normal_(self.bias, std=0.02)

    def _proj_global(self, x: torch.Tensor) -> torch.Tensor:
        """``proj`` on the (B, C, 1, 1) global mean; at batch 1 in training the BN uses its running statistics."""
        if not (self.training and x.shape[0] == 1):
            return self.proj(x)
        first = self.proj[0]
        bn = first.bn
        if bn.running_mean is None or bn.running_var is None:
            return self.proj(x)  # no running statistics to fall back on: BatchNorm raises its own error
        y = F.batch_norm(first.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0., bn.eps)
        return self.proj[1](first.activate(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        scale = self.proj(self.pool(x)).reshape(B, self.num_groups, C, self.K, self.K)
        scale = torch.softmax(scale, dim=1)
        weight = torch.sum(scale * self.weight.unsqueeze(0), dim=1).reshape(-1, 1, self.K, self.K)
        bias: Optional[torch.Tensor] = None
        if self.bias is not None:
            scale = self._proj_global(torch.mean(x, dim=[-2, -1], keepdim=True))
            scale = torch.softmax(scale.reshape(B, self.num_groups, C), dim=1)
            bias = torch.sum(scale * self.bias.unsqueeze(0), dim=1).flatten(0)
        x = F.conv2d(x.reshape(1, -1, H, W), weight=weight, padding=self.K // 2, groups=B * C, bias=bias)
        return x.reshape(B, C, H, W)


class OSRAttention(nn.Module):
    """OSRA: q = 1x1(x); kv from an overlapping spatial reduction (dw conv k=sr+3, s=sr -> BN -> GELU -> dw 1x1 -> BN;
    identity at sr=1) plus a residual dw3x3 ``local_conv``; softmax(q k^T * hd^-0.5 + rel_pos) v. No output proj."""

    def __init__(self, dim: int, num_heads: int = 1, qk_scale: Optional[float] = None, attn_drop: float = 0.,
                 sr_ratio: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"OSRA: dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Conv2d(dim, dim, kernel_size=1)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1)
        self.attn_drop = nn.Dropout(attn_drop)
        if sr_ratio > 1:
            self.sr = nn.Sequential(
                ConvBN(dim, dim, kernel_size=sr_ratio + 3, stride=sr_ratio, padding=(sr_ratio + 3) // 2, groups=dim,
                       act=True),
                ConvBN(dim, dim, kernel_size=1, groups=dim),
            )
        else:
            self.sr = nn.Identity()
        self.local_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, relative_pos_enc: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.q(x).reshape(B, self.num_heads, self.head_dim, -1).transpose(-1, -2)
        kv = self.sr(x)
        kv = self.local_conv(kv) + kv
        k, v = torch.chunk(self.kv(kv), chunks=2, dim=1)
        k = k.reshape(B, self.num_heads, self.head_dim, -1)
        v = v.reshape(B, self.num_heads, self.head_dim, -1).transpose(-1, -2)
        attn = (q @ k) * self.scale
        if relative_pos_enc is not None:
            attn = attn + resize_rel_pos(relative_pos_enc, attn.shape[-2], attn.shape[-1])
        attn = self.attn_drop(torch.softmax(attn, dim=-1))
        x = (attn @ v).transpose(-1, -2)
        return x.reshape(B, C, H, W)


def rel_pos_shape(feat_size: Sequence[int], num_heads: int, sr_ratio: int) -> Tuple[int, int, int, int]:
    """Shape of an OSRA relative position bias for a (h, w) map: (1, heads, h*w, ceil(h/sr)*ceil(w/sr))."""
    h, w = int(feat_size[0]), int(feat_size[1])
    return 1, num_heads, h * w, math.ceil(h / sr_ratio) * math.ceil(w / sr_ratio)


def _default_heads(half_dim: int, head_dim: int = 32) -> int:
    n = max(1, round(half_dim / head_dim))
    while half_dim % n:
        n -= 1
    return n


@register_mixer("dmixer")
class DMixer(nn.Module):
    """TransXNet's D-Mixer (official ``HybridTokenMixer``), (B, C, H, W) -> (B, C, H, W).

    Args:
        dim: channels (even).
        kernel_size, num_groups: IDConv kernel size and number of mixed kernels (official 7, 2-4).
        num_heads: OSRA heads on the dim/2 attention half (default: head dim about 32).
        sr_ratio: OSRA spatial reduction (official 8, 4, 2, 1 per stage; default from ``stage_idx``, else 1).
        reduction_ratio: STE bottleneck ``max(16, dim // reduction_ratio)``.
        rel_pos: give the mixer its OWN relative position bias (zeros, built for ``feat_size``) used when ``forward``
            gets none. TransXNet itself shares one bias per stage and passes it in (rel_pos=False there). Default:
            True when ``feat_size`` is known (as inside ``zoo_metaformer``), else False.
    """

    def __init__(self, dim: int, kernel_size: int = 7, num_groups: int = 2, num_heads: Optional[int] = None,
                 sr_ratio: Optional[int] = None, reduction_ratio: int = 8, attn_drop: float = 0.,
                 rel_pos: Optional[bool] = None, feat_size: Optional[Sequence[int]] = None,
                 stage_idx: Optional[int] = None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"DMixer: dim {dim} must be even (channels are split in halves)")
        if sr_ratio is None:
            sr_ratio = (8, 4, 2, 1)[min(stage_idx, 3)] if stage_idx is not None else 1
        if num_heads is None:
            num_heads = _default_heads(dim // 2)
        self.local_unit = DynamicConv2d(dim // 2, kernel_size=kernel_size, num_groups=num_groups)
        self.global_unit = OSRAttention(dim // 2, num_heads=num_heads, attn_drop=attn_drop, sr_ratio=sr_ratio)
        inner_dim = max(16, dim // reduction_ratio)
        self.proj = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim),
            nn.GELU(),
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, inner_dim, kernel_size=1),
            nn.GELU(),
            nn.BatchNorm2d(inner_dim),
            nn.Conv2d(inner_dim, dim, kernel_size=1),
            nn.BatchNorm2d(dim),
        )
        if rel_pos is None:
            rel_pos = feat_size is not None
        if rel_pos:
            if feat_size is None:
                raise ValueError("DMixer(rel_pos=True) needs feat_size=(h, w) to size its relative position bias")
            self.relative_pos_enc = nn.Parameter(torch.zeros(rel_pos_shape(feat_size, num_heads, sr_ratio)))
            self.no_weight_decay_keys = ("relative_pos_enc",)
        else:
            self.relative_pos_enc = None

    def forward(self, x: torch.Tensor, relative_pos_enc: Optional[torch.Tensor] = None) -> torch.Tensor:
        if relative_pos_enc is None:
            relative_pos_enc = self.relative_pos_enc
        x1, x2 = torch.chunk(x, chunks=2, dim=1)
        x1 = self.local_unit(x1)
        x2 = self.global_unit(x2, relative_pos_enc)
        x = torch.cat([x1, x2], dim=1)
        return self.proj(x) + x

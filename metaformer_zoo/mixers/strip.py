"""Strip-MLP token mixers (Cao et al., "Strip-MLP: Efficient Token Interaction for Vision MLP", ICCV 2023;
Med-Process/Strip_MLP ``models/strip_mlp.py``).

* ``CGSMM`` (registered ``"cgsmm"``): cascade group strip mixing. Channels are split into ``patch`` groups of
  ``G = C / patch`` channels; channel ``c`` uses strip matrix ``c % G`` (shared by c, c + G, ...). ``proj_h`` mixes
  every row densely along **W** (W x W) over 3 adjacent rows; then ``fuse_h(cat[x_h, x])`` -> BN -> GELU -> + pos_w;
  ``proj_w`` mixes along **H** over 3 adjacent columns; ``fuse_w(cat[x, x_w])`` (note: the *input* x). A Toeplitz
  relative-position bias (tables ``relate_pos_h/w``, (2L+1, C)) is added before each projection. The official
  names are kept (``proj_h`` mixes along W, as official). Both projections are the ``strip_mix`` kernel op.
* ``LSMM`` (registered ``"lsmm"``): local strip mixing: depthwise (3x7) and (7x3) convs and a ViP-style 3-way split
  attention (``reweight``).
* ``StripMLPBlock``: 1x1 conv + BN + GELU, then CGSMM on the first half of the channels and LSMM on the second, then
  ``fuse``; ``StripTokenMixing`` (registered ``"strip"``): pre-activation depthwise 3x3 (BN -> GELU -> DWConv) then
  ``StripMLPBlock``. The key names follow the official code, with the CGSMM / LSMM parts in sub-modules.

Sizes. The official strip weights are dense (G W, W, 1, 3) / (G H, H, 1, 3) convs tied to the training feature size
(56/28/14/7 at 224 px) and the official model only runs at that size (square). Here, at any other feature size
(including non-square maps), each per-group L x L strip matrix is resampled **bilinearly** (align_corners=False) to
L' x L' and scaled by L / L' (a discretised integral operator keeps its gain), the bias likewise resampled: a zoo
extension, exact at the trained size, untrained elsewhere (fine-tune for dense prediction). ``strict_size=True``
raises instead. The relative-position tables need nothing: the official lookup clamps distances to the table.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_notrace_function

from ..kernels import autocast_dtype, resolve_backend
from ..kernels.strip_mix import strip_mix, strip_mix_reference
from . import register_mixer

__all__ = ["CGSMM", "LSMM", "StripMLPBlock", "StripTokenMixing", "RelativePosition", "strip_groups",
           "resize_strip_weight", "strip_mix_op"]


@register_notrace_function
def strip_mix_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], axis: str, raft_size: int,
                 backend: str = "auto") -> torch.Tensor:
    """``metaformer_zoo.kernels.strip_mix`` as the mixers call it: eager, FX (a leaf) and TorchScript.

    Eager (and FX leaf) calls: where the dispatch (``resolve_backend``, including ``METAFORMER_ZOO_KERNELS``) picks
    the reference (CPU; CUDA until the kernel is GPU-verified) the reference formula runs directly under autograd (a
    grouped convolution, or a batched matmul for K = 1, with their own backward, as the official code runs them);
    otherwise the kernel package's op (argument checks, autocast, Triton with its fallback). Under TorchScript the
    registered op ``torch.ops.metaformer_zoo.strip_mix`` is called directly: weights in x's dtype, ``backend="auto"``
    -> the reference (a scripted call has no kernel fallback, and no strip-mix kernel is GPU-verified yet: see
    kernels/README.md; TorchScript reads no environment variables, so pass ``backend="triton"`` to opt in).
    """
    if torch.jit.is_scripting():
        if backend == "auto":
            backend = "reference"
        b: Optional[torch.Tensor] = None
        if bias is not None:
            b = bias.to(x.dtype)
        return torch.ops.metaformer_zoo.strip_mix(x, weight.to(x.dtype), b, axis, raft_size, backend)
    if resolve_backend(backend, x, weight, bias, op="strip_mix") == "reference":
        if autocast_dtype(x.device.type) is None:  # under autocast the convolution / matmul cast themselves
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return strip_mix_reference(x, weight, bias, axis, raft_size)
    return strip_mix(x, weight, bias, axis, raft_size, backend)


def strip_groups(channels: int) -> int:
    """Official rule for the full block width ``channels``: patch = 2 if channels % 80 == 0 else 4; the strip
    mixer (on channels / 2) then has G = channels / (2 * patch) weight groups."""
    patch = 2 if channels % 80 == 0 else 4
    return int(channels * 0.5 / patch)


@register_notrace_function
def resize_strip_weight(weight: torch.Tensor, bias: Optional[torch.Tensor], length: int, strict: bool = False,
                        name: str = "strip"):
    """(G, L, L, K) strip weight / (G, L) bias for a map of size ``length`` along the mixing axis.

    Exact at the trained ``L``; otherwise bilinear resampling of each L x L matrix to ``length`` x ``length`` scaled
    by L / length (and linear resampling of the bias), or a ValueError when ``strict``.
    """
    G, L, _, K = weight.shape
    if length == L:
        return weight, bias
    if strict:
        raise ValueError(
            f"{name}: the strip weights were trained for a feature size of {L} along this axis but the map has "
            f"{length}. Strip-MLP (official) only runs at its training resolution; use that input size (e.g. 224 px "
            f"for 56/28/14/7 maps), build the model with img_size=<your size> (no pretrained weights), or allow the "
            f"zoo's strip-weight resampling (strict_size=False).")
    w = weight.permute(0, 3, 1, 2).reshape(G * K, 1, L, L)
    w = F.interpolate(w, size=(length, length), mode="bilinear", align_corners=False) * (L / length)
    w = w.reshape(G, K, length, length).permute(0, 2, 3, 1)
    if bias is not None:
        bias = F.interpolate(bias.unsqueeze(1), size=length, mode="linear", align_corners=False).squeeze(1)
    return w, bias


class RelativePosition(nn.Module):
    """Official Toeplitz relative-position table: ``pos[i, j] = table[clamp(j - i, -max, max) + max]``."""
    no_weight_decay_keys = ("embeddings_table",)

    def __init__(self, num_units: int, max_relative_position: int):
        super().__init__()
        self.num_units = num_units
        self.max_relative_position = max_relative_position
        self.embeddings_table = nn.Parameter(torch.empty(max_relative_position * 2 + 1, num_units))
        nn.init.xavier_uniform_(self.embeddings_table)
        trunc_normal_(self.embeddings_table, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, C, H, W) bias for the map ``x`` (official ``relate_pos(H, W)`` permuted to NCHW)."""
        return _rel_pos(self.embeddings_table, x, self.max_relative_position)


@register_notrace_function
def _rel_pos(table: torch.Tensor, x: torch.Tensor, max_rel: int) -> torch.Tensor:
    H, W = x.shape[-2], x.shape[-1]
    q = torch.arange(H, device=table.device)
    k = torch.arange(W, device=table.device)
    idx = (k[None, :] - q[:, None]).clamp(-max_rel, max_rel) + max_rel
    return table[idx].permute(2, 0, 1).unsqueeze(0).to(x.dtype)


@register_mixer("cgsmm")
class CGSMM(nn.Module):
    """Cascade group strip mixing on ``dim`` channels (official ``StripMLP_Block.strip_mlp`` on channels/2).

    ``groups``: number of distinct strip matrices G (default: the official rule for a block of width 2 * dim).
    ``feat_size``: the (H, W) the strips are built for (official: square).
    """

    def __init__(self, dim: int, feat_size: Tuple[int, int] = (14, 14), groups: Optional[int] = None,
                 strict_size: bool = False, backend: str = "auto"):
        super().__init__()
        H, W = (feat_size, feat_size) if isinstance(feat_size, int) else tuple(feat_size)
        G = groups or strip_groups(2 * dim)
        if dim % G:
            raise ValueError(f"CGSMM: dim {dim} is not divisible by {G} strip groups")
        self.dim, self.groups, self.feat_size = dim, G, (int(H), int(W))
        self.strict_size, self.backend = strict_size, backend
        # official layout: Conv2d(G*L, G*L, (1, 3), padding (0, 1), groups=G): weight (G*L, L, 1, 3), bias (G*L)
        self.proj_h = nn.Conv2d(W * G, W * G, (1, 3), padding=(0, 1), groups=G, bias=True)  # mixes along W
        self.proj_w = nn.Conv2d(H * G, H * G, (1, 3), padding=(0, 1), groups=G, bias=True)  # mixes along H
        self.fuse_h = nn.Conv2d(2 * dim, dim, 1, bias=False)
        self.fuse_w = nn.Conv2d(2 * dim, dim, 1, bias=False)
        self.BN = nn.BatchNorm2d(dim)
        self.activation = nn.GELU()
        self.relate_pos_h = RelativePosition(dim, H)
        self.relate_pos_w = RelativePosition(dim, W)

    def _proj(self, x: torch.Tensor, conv: nn.Conv2d, axis: str) -> torch.Tensor:
        """Strip projection ``conv`` (``proj_h`` or ``proj_w``) along ``axis`` (eager helper)."""
        return self._strip_proj(x, conv.weight, conv.bias, axis)

    def _strip_proj(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    axis: str) -> torch.Tensor:
        """One strip projection (``proj_h`` / ``proj_w`` weights) along ``axis``, resized to the map if needed."""
        L_trained = weight.shape[1]
        w = weight.view(self.groups, L_trained, L_trained, 3)
        b: Optional[torch.Tensor] = None
        if bias is not None:
            b = bias.view(self.groups, L_trained)
        length = x.shape[-1] if axis == "w" else x.shape[-2]
        w, b = resize_strip_weight(w, b, length, self.strict_size, "Strip-MLP " + axis + "-strip")
        return strip_mix_op(x, w, b, axis, 1, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_h = self._strip_proj(x + self.relate_pos_h(x), self.proj_h.weight, self.proj_h.bias, "w")
        x_h = self.fuse_h(torch.cat([x_h, x], dim=1))
        x_h = self.activation(self.BN(x_h)) + self.relate_pos_w(x)
        x_w = self._strip_proj(x_h, self.proj_w.weight, self.proj_w.bias, "h")
        return self.fuse_w(torch.cat([x, x_w], dim=1))


class ReweightMlp(nn.Module):
    """Official ``Mlp`` of ``reweight``: 1x1 convs ``fc1`` -> GELU -> ``fc2``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@register_mixer("lsmm")
class LSMM(nn.Module):
    """Local strip mixing (official names: ``fc_h`` is the (3, 7) depthwise conv, ``fc_w`` the (7, 3) one)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc_h = nn.Conv2d(dim, dim, (3, 7), padding=(1, 3), groups=dim, bias=False)
        self.fc_w = nn.Conv2d(dim, dim, (7, 3), padding=(3, 1), groups=dim, bias=False)
        self.reweight = ReweightMlp(dim, dim // 2, dim * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[0], x.shape[1]
        x_w = self.fc_h(x)
        x_h = self.fc_w(x)
        att = F.adaptive_avg_pool2d(x_h + x_w + x, output_size=1)
        att = self.reweight(att).reshape(N, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(-1).unsqueeze(-1)
        return x_h * att[0] + x_w * att[1] + x * att[2]


class StripMLPBlock(nn.Module):
    """Official ``StripMLP_Block``: mlp (1x1 conv + BN + GELU) -> [CGSMM | LSMM] on the two channel halves -> fuse."""

    def __init__(self, channels: int, feat_size: Tuple[int, int] = (14, 14), strict_size: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if channels % 2:
            raise ValueError(f"Strip-MLP block: channels {channels} must be even")
        self.channels = channels
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=True), nn.BatchNorm2d(channels), nn.GELU())
        self.cgsmm = CGSMM(channels // 2, feat_size, strip_groups(channels), strict_size, backend)
        self.lsmm = LSMM(channels // 2)
        self.fuse = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        half = self.channels // 2
        x1 = self.cgsmm(x[:, :half])
        x2 = self.lsmm(x[:, half:])
        return self.fuse(torch.cat([x1, x2], dim=1))


class PreActConv(nn.Module):
    """Official ``BN_Activ_Conv``: BN -> GELU -> depthwise 3x3 conv (no bias)."""

    def __init__(self, channels: int):
        super().__init__()
        self.BN = nn.BatchNorm2d(channels)
        self.Activation = nn.GELU()
        self.Conv = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)

    def forward(self, x):
        return self.Conv(self.Activation(self.BN(x)))


class DepthWiseConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_merge = PreActConv(channels)

    def forward(self, x):
        return self.conv_merge(x)


@register_mixer("strip")
class StripTokenMixing(nn.Module):
    """Official ``TokenMixing``: ``dwsc`` (BN -> GELU -> DWConv 3x3) then ``smlp_block`` (StripMLPBlock)."""

    def __init__(self, dim: int, feat_size: Tuple[int, int] = (14, 14), strict_size: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.smlp_block = StripMLPBlock(dim, feat_size, strict_size, backend)
        self.dwsc = DepthWiseConv(dim)

    def forward(self, x):
        return self.smlp_block(self.dwsc(x))

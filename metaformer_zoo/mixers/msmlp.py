"""MS-MLP's mix-shift token mixer (Zheng et al., "Mixing and Shifting", arXiv 2202.06510; JegZheng/MS-MLP).

The channels are split into ``shift_groups`` groups with ``torch.chunk`` semantics (every group ``ceil(C / G)``
channels, the last one smaller). Group ``g`` is, on two branches,

* ``lr``: circularly shifted along W by ``shift_dist[g]`` (``torch.roll(x_g, s, dims=3)``), then
* ``td``: circularly shifted along H by ``shift_dist[g]`` (``torch.roll(x_g, s, dims=2)``),

each followed by a depthwise ``k_g x k_g`` conv with bias and **zero** padding ``k_g // 2``. The mixer returns
``cat(lr) + cat(td)``. The roll comes *before* the zero-padded conv, so in the rolled frame only the *source* index
wraps while the zero mask is that of the unrolled image::

    lr[c, h, w] = b[c] + sum_{i,j} K[c, i, j] * x[c, h + i - p, (w + j - p - s) mod W]
                  (term is 0 when h + i - p or w + j - p falls outside the image)

The default (shift, kernel) pairs of the official configs are asymmetric: group 0 is shifted by -2 with a 1x1 kernel
and group 4 by +2 with a 7x7 kernel (``MIX_SIZES``). The official block has no norm before this mixer; the MS-MLP
model (``metaformer_zoo.models.msmlp``) follows it with LN -> MLP in one residual branch. Used in other skeletons
(``zoo_metaformer``) it is an ordinary token mixer.

Kernel seam: ``mix_shift(x, lr_weights, lr_biases, td_weights, td_biases, kernel_sizes, shift_dist, chunk_sizes)`` is
the whole op as a plain function of tensors and static ints. It is the PyTorch reference (the exact op sequence of
the official code); a fused kernel (see reference/mlp_freq.md section 5.3) can implement the same signature.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_mixer

__all__ = ["MixShift", "mix_shift", "chunk_sizes", "MIX_SIZES", "SHIFT_DIST"]

# official configs (configs/msmlp_{tiny,small,base}_patch4_shift5_224.yaml): MIX_SIZE per stage, SHIFT_DIST
MIX_SIZES: Tuple[Tuple[int, ...], ...] = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
SHIFT_DIST: Tuple[int, ...] = (-2, -1, 0, 1, 2)


def chunk_sizes(dim: int, groups: int) -> List[int]:
    """Channel group sizes of ``torch.chunk(x, groups, dim=1)`` for ``dim`` channels (last group smaller).

    ``torch.chunk`` may return fewer than ``groups`` chunks (e.g. 6 channels in 5 chunks gives 3 chunks of 2); the
    official block then fails with an IndexError, here a ValueError says which widths work.
    """
    if dim <= 0 or groups <= 0:
        raise ValueError(f"mix-shift needs a positive channel count and group count, got dim={dim}, groups={groups}")
    step = -(-dim // groups)  # ceil
    sizes = [min(step, dim - i) for i in range(0, dim, step)]
    if len(sizes) != groups:
        raise ValueError(
            f"mix-shift cannot split {dim} channels into {groups} groups the way the official code does "
            f"(torch.chunk gives {len(sizes)} chunks of {sizes}). Use a channel count with "
            f"ceil(dim / {groups}) * {groups - 1} < dim, e.g. {groups * step}, or fewer shift groups."
        )
    return sizes


def mix_shift(
        x: torch.Tensor,
        lr_weights: List[torch.Tensor],
        lr_biases: List[Optional[torch.Tensor]],
        td_weights: List[torch.Tensor],
        td_biases: List[Optional[torch.Tensor]],
        kernel_sizes: List[int],
        shift_dist: List[int],
        chunk_sizes: List[int],
) -> torch.Tensor:
    """The mix-shift op on a (B, C, H, W) map (PyTorch reference, same op sequence as the official block).

    Args:
        x: (B, C, H, W) input.
        lr_weights, td_weights: per group ``g`` a depthwise weight of shape (c_g, 1, k_g, k_g) for the W-shift (lr)
            and the H-shift (td) branch.
        lr_biases, td_biases: per group a (c_g,) bias (or None).
        kernel_sizes: k_g per group (odd; padding k_g // 2, zeros).
        shift_dist: circular shift s_g per group (``torch.roll`` sign convention: out[i] = in[i - s]).
        chunk_sizes: c_g per group, summing to C (``chunk_sizes(C, G)`` reproduces ``torch.chunk``).

    Returns:
        (B, C, H, W): ``cat_g(dwconv_lr_g(roll_W(x_g, s_g))) + cat_g(dwconv_td_g(roll_H(x_g, s_g)))``.
    """
    xs = torch.split(x, chunk_sizes, dim=1)
    lr: List[torch.Tensor] = []
    td: List[torch.Tensor] = []
    for g in range(len(chunk_sizes)):
        xg = xs[g]
        s = shift_dist[g]
        p = kernel_sizes[g] // 2
        c = chunk_sizes[g]
        lr.append(F.conv2d(torch.roll(xg, s, 3), lr_weights[g], lr_biases[g], 1, p, 1, c))
        td.append(F.conv2d(torch.roll(xg, s, 2), td_weights[g], td_biases[g], 1, p, 1, c))
    return torch.cat(lr, 1) + torch.cat(td, 1)


@register_mixer("mixshift")
class MixShift(nn.Module):
    """MS-MLP token mixer: per channel group a circular shift then a zero-padded depthwise conv, along W and H.

    Args:
        dim: channels.
        shift_groups: number of channel groups (the official ``SHIFT_SIZE``; it is a group count, not pixels).
        shift_dist: circular shift per group (official ``SHIFT_DIST`` = (-2, -1, 0, 1, 2)).
        mix_size: depthwise kernel size per group (odd). Default: the official ``MIX_SIZE`` of stage ``stage_idx``
            (``MIX_SIZES``; stages past 3 use the last entry), or of stage 0 without a stage index.
        stage_idx: stage context from the skeleton (chooses the default ``mix_size``).

    Keys ``dwconv_lr.{g}`` / ``dwconv_td.{g}`` (Conv2d with bias) match the official ``MixShiftBlock``.
    """

    def __init__(
            self,
            dim: int,
            shift_groups: int = 5,
            shift_dist: Sequence[int] = SHIFT_DIST,
            mix_size: Optional[Sequence[int]] = None,
            stage_idx: Optional[int] = None,
    ):
        super().__init__()
        if mix_size is None:
            mix_size = MIX_SIZES[min(stage_idx or 0, len(MIX_SIZES) - 1)]
        shift_dist = [int(s) for s in shift_dist]
        mix_size = [int(k) for k in mix_size]
        if len(shift_dist) != shift_groups or len(mix_size) != shift_groups:
            raise ValueError(
                f"mix-shift with shift_groups={shift_groups} needs {shift_groups} shift distances and kernel sizes, "
                f"got shift_dist={shift_dist} and mix_size={mix_size}"
            )
        if any(k < 1 or k % 2 == 0 for k in mix_size):
            raise ValueError(f"mix-shift kernel sizes must be odd and positive (same-size output), got {mix_size}")
        self.dim = dim
        self.shift_groups = shift_groups
        self.shift_dist: List[int] = shift_dist
        self.kernel_sizes: List[int] = mix_size
        self.chunk_sizes: List[int] = chunk_sizes(dim, shift_groups)
        self.dwconv_lr = nn.ModuleList([
            nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.chunk_sizes, mix_size)])
        self.dwconv_td = nn.ModuleList([
            nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.chunk_sizes, mix_size)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lr_w: List[torch.Tensor] = []
        lr_b: List[Optional[torch.Tensor]] = []
        td_w: List[torch.Tensor] = []
        td_b: List[Optional[torch.Tensor]] = []
        for conv in self.dwconv_lr:
            lr_w.append(conv.weight)
            lr_b.append(conv.bias)
        for conv in self.dwconv_td:
            td_w.append(conv.weight)
            td_b.append(conv.bias)
        return mix_shift(x, lr_w, lr_b, td_w, td_b, self.kernel_sizes, self.shift_dist, self.chunk_sizes)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.chunk_sizes}, shift_dist={self.shift_dist}, kernels={self.kernel_sizes}"

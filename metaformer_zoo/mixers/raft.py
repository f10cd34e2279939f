"""RaftMLP's token mixer (Tatsunami & Taki, "RaftMLP", arXiv 2108.04384; okojoalg/raft-mlp ``libs/modules.py``).

The channels of a (B, C, H, W) map are split into rafts of ``raft_size`` r **strided** channels: raft ``co`` is
{co, co + C/r, ..., co + (r-1) C/r} (official ``b (h w) (chw co)``, chw = slow index). For every column, the r*H values
of a raft are mixed by a token MLP ``Linear(rH -> e rH) -> GELU -> Linear(e rH -> rH)`` (vertical), then likewise
along the rows (horizontal). Each direction is a pre-norm residual sub-block ``x + DropPath(MLP(LN(x)))``; the
official LN runs on a rearranged ``(c1 c2)`` channel order, so its weight index ``co * r + chw`` belongs to channel
``chw * C/r + co``. Here the LN runs in natural channel order and ``checkpoint_filter_fn`` permutes the official
weights (``raft_ln_from_official`` / ``raft_ln_to_official``).

The token MLP weights are tied to the grid (ph, pw) the model was built for (56/28/14/7 at 224 px). At any other
feature size the official code bicubically resamples the **feature map** to (ph, pw) before the two sub-blocks and
back afterwards (``RaftShrink`` / ``RaftExpansion``, ``align_corners=False``); this is reproduced exactly.

The mixing itself is the ``metaformer_zoo.kernels.strip_mix`` op (two calls per direction, GELU between), called
through ``metaformer_zoo.mixers.strip.strip_mix_op`` so that TorchScript can compile it, whenever a kernel is selected
(``METAFORMER_ZOO_KERNELS`` / ``TRITON_INTERPRET=1`` / a GPU-verified op on CUDA). When the dispatch resolves to the
op's reference (the default today, and always on CPU) ``RaftTokenMixing`` computes the same function directly in
NHWC: one LayerNorm over the channels, one permute-copy to (B, P, M, r L) per direction, two ``F.linear`` and a
residual add in 5-D; about as many memory passes as the official einops code. The op wrapper (argument checks,
autocast, dispatch, custom-op boxing) and its NCHW round trips cost RaftMLP ~20 % on CPU.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from timm.models import register_notrace_function, register_notrace_module

from ..kernels import resolve_backend
from . import register_mixer
from .strip import strip_mix_op

__all__ = ["RaftTokenMLP", "RaftTokenMixing", "raft_ln_from_official", "raft_ln_to_official"]


def raft_ln_from_official(w: torch.Tensor, raft_size: int) -> torch.Tensor:
    """Official permuted LN weight (index co * r + chw) -> natural channel order (index chw * C/r + co)."""
    C = w.shape[0]
    return w.reshape(C // raft_size, raft_size).t().reshape(C).contiguous()


def raft_ln_to_official(w: torch.Tensor, raft_size: int) -> torch.Tensor:
    C = w.shape[0]
    return w.reshape(raft_size, C // raft_size).t().reshape(C).contiguous()


@register_notrace_function
def resample_to(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic (align_corners=False) resize of a NCHW map to ``size``; no-op when it already has that size."""
    if x.shape[-2] == size[0] and x.shape[-1] == size[1]:
        return x
    return F.interpolate(x, size=[size[0], size[1]], mode="bicubic", align_corners=False)


@register_notrace_function
def resample_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return resample_to(x, (ref.shape[-2], ref.shape[-1]))


class RaftTokenMLP(nn.Module):
    """LN over channels -> raft token MLP along ``axis`` ("h": vertical, "w": horizontal). No residual.

    Parameters: ``norm`` (natural channel order), ``fc1`` Linear(rL, e rL), ``fc2`` Linear(e rL, rL) with the official
    (out, in) weight layout, L = ``length`` (the grid size along ``axis``).
    """

    def __init__(self, dim: int, length: int, raft_size: int = 2, expansion: int = 2, axis: str = "h",
                 drop: float = 0., norm_eps: float = 1e-5):
        super().__init__()
        if dim % raft_size:
            raise ValueError(f"raft mixer: dim {dim} is not divisible by raft_size {raft_size}")
        self.axis, self.raft_size, self.expansion, self.length = axis, raft_size, expansion, length
        n = raft_size * length
        self.norm = LayerNorm2d(dim, eps=norm_eps)
        self.fc1 = nn.Linear(n, n * expansion)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(n * expansion, n)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        r, e = self.raft_size, self.expansion
        y = self.norm(x)
        y = strip_mix_op(y, self.fc1.weight.unsqueeze(0).unsqueeze(-1), self.fc1.bias.view(1, -1),
                      self.axis, r, backend)
        y = self.drop(self.act(y))
        y = strip_mix_op(y, self.fc2.weight.unsqueeze(0).unsqueeze(-1), self.fc2.bias.view(1, -1),
                      self.axis, r * e, backend)
        return self.drop(y)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """Plain-PyTorch path on a (B, H, W, C) map (any strides): the MLP branch as a (B, H, W, r, C / r) view.

        Same function as ``forward`` with ``backend="reference"`` (up to float rounding), with no NCHW round trip.
        """
        B, H, W, C = x.shape
        r = self.raft_size
        M = C // r
        y = F.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        y = y.view(B, H, W, r, M)
        # rows of the token MLP: (B, P, M, r, L); L = H (vertical) or W (horizontal)
        y = y.permute(0, 2, 4, 3, 1) if self.axis == "h" else y.permute(0, 1, 4, 3, 2)
        P, L = y.shape[1], y.shape[4]
        y = y.reshape(B, P, M, r * L)
        y = self.drop(self.fc2(self.drop(self.act(self.fc1(y)))))
        y = y.view(B, P, M, r, L)
        return y.permute(0, 4, 1, 3, 2) if self.axis == "h" else y.permute(0, 1, 4, 3, 2)


@register_notrace_module  # a leaf for FX: the dispatch below is Python control flow
class RaftTokenMixing(nn.Module):
    """Serial vertical + horizontal raft token mixing with its own pre-norm residuals (one official RaftMLP block
    minus the channel MLP), including the bicubic resampling to the built grid ``feat_size`` at other sizes.

    ``return_delta=True`` returns ``mixed - x`` (the zoo's registered ``"raft"`` mixer), so inside a MetaFormer block
    ``x + mixer(norm1(x))`` adds exactly the raft sub-blocks' update.
    """

    def __init__(self, dim: int, feat_size: Tuple[int, int] = (14, 14), raft_size: int = 2, token_expansion: int = 2,
                 drop_path: float = 0., proj_drop: float = 0., return_delta: bool = False):
        super().__init__()
        self.grid = (int(feat_size[0]), int(feat_size[1]))
        self.return_delta = return_delta
        self.vertical = RaftTokenMLP(dim, self.grid[0], raft_size, token_expansion, "h", proj_drop)
        self.horizontal = RaftTokenMLP(dim, self.grid[1], raft_size, token_expansion, "w", proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = resample_to(x, self.grid)
        if torch.jit.is_scripting():  # scripted calls go through the op (strip_mix_op)
            y = self._forward_op(y)
        elif resolve_backend("auto", y, op="strip_mix") == "reference":
            y = self._forward_nhwc(y)
        else:
            y = self._forward_op(y)
        y = resample_like(y, x)
        return y - x if self.return_delta else y

    def _forward_op(self, y: torch.Tensor) -> torch.Tensor:
        """Both sub-blocks through the ``strip_mix`` op (NCHW)."""
        y = y + self.drop_path(self.vertical(y))
        return y + self.drop_path(self.horizontal(y))

    def _forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """Both sub-blocks in NHWC (reference dispatch); returns NCHW (a view of an NHWC-contiguous tensor)."""
        B, C, H, W = x.shape
        r = self.vertical.raft_size
        y = x.permute(0, 2, 3, 1).contiguous().view(B, H, W, r, C // r)
        y = y + self.drop_path(self.vertical.forward_nhwc(y.reshape(B, H, W, C)))
        y = y.reshape(B, H, W, r, C // r)
        y = y + self.drop_path(self.horizontal.forward_nhwc(y.reshape(B, H, W, C)))
        return y.reshape(B, H, W, C).permute(0, 3, 1, 2)


@register_mixer("raft")
def raft_mixer(dim: int, feat_size: Tuple[int, int] = (14, 14), raft_size: int = 2, token_expansion: int = 2,
               drop_path: float = 0., proj_drop: float = 0.) -> RaftTokenMixing:
    """Composable RaftMLP mixer: ``feat_size`` (given by the skeleton) sets the token-MLP grid; r = 2, e = 2."""
    return RaftTokenMixing(dim, feat_size, raft_size, token_expansion, drop_path=drop_path, proj_drop=proj_drop,
                           return_delta=True)

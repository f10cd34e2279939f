"""Plain-PyTorch oracle of ``strip_mix``: dense mixing along one spatial axis within channel groups.

Notation (``axis="h"``; ``axis="w"`` swaps the roles of H and W):

* ``x``: (B, C, H, W); mixing runs along H (length ``L = H``), ``P = W`` independent positions ("columns").
* ``raft_size`` r_in: the channel index is split as ``c = j * M + co`` with ``M = C / r_in`` rafts and ``j < r_in``
  (RaftMLP's strided rafts: raft ``co`` = channels {co, co + M, ..., co + (r_in - 1) M}).
* ``weight``: (G, F_out, r_in * L, K). ``G`` weight groups: raft ``co`` uses ``weight[co % G]`` (Strip-MLP shares one
  strip matrix between the channel groups ``c`` and ``c + G``). ``K`` (odd) is a zero-padded window across the other
  axis (Strip-MLP's (1, 3) conv: 3 adjacent columns). ``F_out = r_out * L``.
* ``bias``: (G, F_out) or None.

    out[b, jo * M + co, lo, p] = bias[g, jo * L + lo]
        + sum_{j, l, k} weight[g, jo * L + lo, j * L + l, k] * x[b, j * M + co, l, p + k - K // 2],   g = co % G

so the output is (B, r_out * M, L, P) (for ``axis="w"``: (B, r_out * M, P, L)). RaftMLP's token MLP is two calls
(``r_out = 2 r`` then ``r``) with a GELU between; Strip-MLP's ``proj_h``/``proj_w`` are one call each.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["strip_mix_reference", "strip_mix_backward_reference", "check_args"]


def check_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], axis: str,
               raft_size: int) -> Tuple[int, int, int, int, int, int]:
    """Validate shapes; return (L, P, M, G, r_out, K)."""
    if axis not in ("h", "w"):
        raise ValueError(f"strip_mix: axis must be 'h' or 'w', got {axis!r}")
    if x.dim() != 4:
        raise ValueError(f"strip_mix: x must be (B, C, H, W), got shape {list(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"strip_mix: weight must be (G, F_out, raft_size * L, K), got shape {list(weight.shape)}")
    B, C, H, W = x.shape
    L, P = (H, W) if axis == "h" else (W, H)
    G, Fo, Fi, K = weight.shape
    if raft_size < 1 or C % raft_size:
        raise ValueError(f"strip_mix: channels {C} are not divisible by raft_size {raft_size}")
    M = C // raft_size
    if Fi != raft_size * L:
        raise ValueError(
            f"strip_mix: weight expects {Fi} inputs per strip but raft_size * L = {raft_size} * {L} = {raft_size * L} "
            f"(x {list(x.shape)}, axis {axis!r}); the strip weights are tied to the feature-map size along the axis")
    if Fo % L:
        raise ValueError(f"strip_mix: weight outputs {Fo} per strip, not a multiple of L = {L}")
    if M % G:
        raise ValueError(f"strip_mix: {M} rafts are not divisible by {G} weight groups")
    if K % 2 != 1:
        raise ValueError(f"strip_mix: window K = {K} must be odd")
    if bias is not None and tuple(bias.shape) != (G, Fo):
        raise ValueError(f"strip_mix: bias must be {(G, Fo)}, got {list(bias.shape)}")
    return L, P, M, G, Fo // L, K


def _window(xa: torch.Tensor, K: int) -> torch.Tensor:
    """(..., L, P) -> (..., L, P, K) with xw[..., l, p, k] = x[..., l, p + k - K//2] (zero padded)."""
    if K == 1:
        return xa.unsqueeze(-1)
    pad = K // 2
    xp = F.pad(xa, (pad, pad))
    return torch.stack([xp[..., k:k + xa.shape[-1]] for k in range(K)], dim=-1)


def strip_mix_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        axis: str = "h", raft_size: int = 1) -> torch.Tensor:
    """Differentiable reference (autograd through einsum). See the module docstring for the exact formula."""
    L, P, M, G, r_out, K = check_args(x, weight, bias, axis, raft_size)
    B = x.shape[0]
    Q = M // G
    xa = x if axis == "h" else x.transpose(2, 3)  # (B, C, L, P), a view
    xa = xa.reshape(B, raft_size, Q, G, L, P)
    xw = _window(xa, K)  # (B, r, Q, G, L, P, K)
    w = weight.view(G, r_out * L, raft_size, L, K)
    out = torch.einsum("gfjlk,bjqglpk->bqgfp", w, xw)  # (B, Q, G, Fo, P)
    if bias is not None:
        out = out + bias.view(1, 1, G, r_out * L, 1)
    out = out.reshape(B, Q, G, r_out, L, P).permute(0, 3, 1, 2, 4, 5).reshape(B, r_out * M, L, P)
    return out if axis == "h" else out.transpose(2, 3).contiguous()


def strip_mix_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                                 axis: str = "h", raft_size: int = 1):
    """Explicit gradients (dx, dweight, dbias) of ``strip_mix_reference``.

    ``dx`` is ``strip_mix`` itself applied to ``grad_out`` with the transposed, window-flipped weight (raft_size r_out).
    """
    L, P, M, G, r_out, K = check_args(x, weight, None, axis, raft_size)
    B = x.shape[0]
    Q = M // G
    w_t = weight.transpose(1, 2).flip(3)
    dx = strip_mix_reference(grad_out, w_t, None, axis, r_out)
    xa = x if axis == "h" else x.transpose(2, 3)
    xw = _window(xa.reshape(B, raft_size, Q, G, L, P), K)  # (B, r, Q, G, L, P, K)
    ga = grad_out if axis == "h" else grad_out.transpose(2, 3)
    ga = ga.reshape(B, r_out, Q, G, L, P).permute(0, 2, 3, 1, 4, 5).reshape(B, Q, G, r_out * L, P)
    dw = torch.einsum("bqgfp,bjqglpk->gfjlk", ga, xw).reshape(weight.shape)
    db = ga.sum(dim=(0, 1, 4)) if has_bias else None
    return dx, dw, db

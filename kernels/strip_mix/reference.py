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

__all__ = ["strip_mix_reference", "strip_mix_backward_reference", "strip_mix_einsum", "check_args"]


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


def strip_mix_einsum(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     axis: str = "h", raft_size: int = 1) -> torch.Tensor:
    """The formula of the module docstring written out (window stack + einsum; a batched matmul for K = 1)."""
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


def _as_conv_input(x: torch.Tensor, axis: str, raft_size: int, G: int) -> torch.Tensor:
    """x (B, C, H, W) -> the grouped-conv input (B, G * r * L, Q, P): channels (g, j, l), spatial (q, p)."""
    xa = x if axis == "h" else x.transpose(2, 3)  # (B, C, L, P)
    B, C, L, P = xa.shape
    Q = C // raft_size // G
    return xa.reshape(B, raft_size, Q, G, L, P).permute(0, 3, 1, 4, 2, 5).reshape(B, G * raft_size * L, Q, P)


def strip_mix_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        axis: str = "h", raft_size: int = 1) -> torch.Tensor:
    """Differentiable reference. K = 1 (RaftMLP): ``strip_mix_einsum``, a batched matmul. K > 1 (Strip-MLP): a
    grouped convolution (groups G, in (j, l) -> out (jo, lo), a (1, K) window along the positions P) on the map laid
    out as (B, G * r * L, Q, P) channels-last, as the official Strip-MLP writes its strip projections
    (``Conv2d(..., (1, 3), groups=...)`` on a permuted view); one layout copy in, one out. On CPU each form is the
    faster one for its case (about 2x for the Strip-MLP-T stage-1 projection as a convolution; 1.3x for RaftMLP's as
    a matmul)."""
    L, P, M, G, r_out, K = check_args(x, weight, bias, axis, raft_size)
    if K == 1:
        return strip_mix_einsum(x, weight, bias, axis, raft_size)
    B = x.shape[0]
    Q = M // G
    Fo = r_out * L
    # the conv input (B, G*r*L, Q, P) laid out channels-last, as the official Strip-MLP's proj_h input is (a permuted
    # view): oneDNN then runs the grouped (1, K) conv without reordering (measured ~3x faster at the stage-1 shape)
    xa = x if axis == "h" else x.transpose(2, 3)  # (B, C, L, P)
    xin = xa.reshape(B, raft_size, Q, G, L, P).permute(0, 2, 5, 3, 1, 4).reshape(B, Q, P, G * raft_size * L)
    out = F.conv2d(xin.permute(0, 3, 1, 2), weight.reshape(G * Fo, raft_size * L, 1, K),
                   None if bias is None else bias.reshape(G * Fo), padding=(0, K // 2), groups=G)  # (B, G*Fo, Q, P)
    out = out.permute(0, 2, 3, 1).reshape(B, Q, P, G, r_out, L).permute(0, 4, 1, 3, 5, 2).reshape(B, r_out * M, L, P)
    return out if axis == "h" else out.transpose(2, 3).contiguous()


def strip_mix_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                                 axis: str = "h", raft_size: int = 1):
    """Explicit gradients (dx, dweight, dbias) of ``strip_mix_reference``.

    ``dx`` is ``strip_mix`` itself applied to ``grad_out`` with the transposed, window-flipped weight (raft_size r_out).
    """
    L, P, M, G, r_out, K = check_args(x, weight, None, axis, raft_size)
    w_t = weight.transpose(1, 2).flip(3)
    dx = strip_mix_reference(grad_out, w_t, None, axis, r_out)
    go = _as_conv_input(grad_out, axis, r_out, G)  # (B, G * Fo, Q, P): the conv output's layout
    if K == 1:  # sum over batch, q, p of go (g, f) x xa (g, j, l): a batched matmul per group
        xi = _as_conv_input(x, axis, raft_size, G)  # (B, G * r * L, Q, P)
        B, Q, P = x.shape[0], xi.shape[2], xi.shape[3]
        gm = go.reshape(B, G, r_out * L, Q * P).permute(1, 2, 0, 3).reshape(G, r_out * L, B * Q * P)
        xm = xi.reshape(B, G, raft_size * L, Q * P).permute(1, 0, 3, 2).reshape(G, B * Q * P, raft_size * L)
        dw = torch.bmm(gm, xm).view(weight.shape)
    else:
        dw = torch.nn.grad.conv2d_weight(_as_conv_input(x, axis, raft_size, G), (G * r_out * L, raft_size * L, 1, K),
                                         go, padding=(0, K // 2), groups=G).view(weight.shape)
    db = go.sum(dim=(0, 2, 3)).view(G, r_out * L) if has_bias else None
    return dx, dw, db

"""Plain-PyTorch reference of the ViM2 / VMamba 2D selective scan (the oracle for the Triton kernels).

Pieces (all differentiable by autograd):

* ``selective_scan`` -- the semantics of mamba-ssm's ``selective_scan_ref`` (state-spaces/mamba,
  ``mamba_ssm/ops/selective_scan_interface.py``), real A only, computed with a chunked scan: the sequence is cut into
  chunks of ``chunk_size`` steps, each chunk runs a sequential recurrence over its (B, D, T, N) slice and passes its
  last state on. Under autograd every chunk is recomputed in backward (non-reentrant activation checkpointing), so
  only the (B, D, N) state at each chunk start is kept: nothing of size (B, D, L, N) for the whole sequence is ever
  alive. Float32 accumulation whatever the input dtype (float64 stays float64).
* ``cross_scan`` / ``cross_merge`` -- VMamba's 4 routes (``csm_triton.py``, ``scans=0``): 0 row-major, 1 column-major,
  2 reverse of 0, 3 reverse of 1; merge = the exact adjoint of scan (sum of the routes mapped back).
* ``selective_scan2d`` -- the fused 4-route op = ``cross_merge(selective_scan(cross_scan(x)))``.
* ``selective_scan_ref_naive`` -- the direct float64 recurrence that materialises (B, D, L, N), for tiny test shapes.

Recurrence (mamba ``selective_scan_ref``; Euler form of B-bar, not ZOH)::

    delta_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (h_0 = 0)
    y_t = <C_t, h_t> + D * u_t ;   out_t = y_t * silu(z_t) if z is given
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = ["selective_scan", "selective_scan_ref_naive", "cross_scan", "cross_merge", "selective_scan2d",
           "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 32
# cap on the elements of one chunk's (T, batch, dim, N) work tensors: very large batch*dim (e.g. the channel mixer at
# 800x1216, where every token is a batch row) gets shorter chunks instead of gigabyte-sized temporaries
MAX_CHUNK_ELEMENTS = 1 << 23


# ----------------------------------------------------------------------------------------------------------------------
# argument checks shared by the reference and the naive oracle
# ----------------------------------------------------------------------------------------------------------------------
def _check_scan_args(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {list(u.shape)}")
    batch, dim, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {list(u.shape)}, got {list(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {list(u.shape)}, got {list(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim={dim}, N) real, got shape {list(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported by the metaformer_zoo reference (real A only)")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = t.shape == (batch, N, L)
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2:] == (N, L) and t.shape[1] > 0 and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be (batch, N, L)=({batch}, {N}, {L}) or (batch, G, N, L) with "
                f"dim={dim} divisible by G, got shape {list(t.shape)} (time-invariant (dim, N) B/C are not supported)")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim={dim},), got shape {list(t.shape)}")


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L); (batch, G, N, L) unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# the test oracle: direct recurrence in float64, materialising (B, D, L, N)
# ----------------------------------------------------------------------------------------------------------------------
def selective_scan_ref_naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """mamba's ``selective_scan_ref`` written out in float64 (materialises (B, D, L, N); tiny shapes only)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    f = torch.float64
    u, delta, A = u.to(f), delta.to(f), A.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    Bg, Cg = _grouped(B).to(f), _grouped(C).to(f)
    G = Bg.shape[1]
    Bd = Bg.repeat_interleave(dim // G, dim=1)  # (batch, dim, N, L)
    Cd = Cg.repeat_interleave(dim // G, dim=1)
    deltaA = torch.exp(delta[..., None] * A[:, None, :])  # (batch, dim, L, N)
    deltaB_u = delta[..., None] * Bd.transpose(-1, -2) * u[..., None]
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append((h * Cd[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------------------
# the reference: chunked sequential scan, activation-checkpointed per chunk
# ----------------------------------------------------------------------------------------------------------------------
def _scan_chunk(h: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One chunk. h: (b, d, N) carry; u, delta: (b, d, T) (delta already biased/softplused); A: (d, N);
    B, C: (b, G, N, T). Returns y (b, d, T) without the D term, and the chunk's last state."""
    b, d, T = u.shape
    G, N = B.shape[1], B.shape[2]
    dg = d // G
    # step-major layouts so that every step reads a contiguous (b, d, N) slab
    delta_t = delta.permute(2, 0, 1)  # (T, b, d)
    dA = torch.exp(delta_t.unsqueeze(-1) * A)  # (T, b, d, N)
    du = (delta_t * u.permute(2, 0, 1)).reshape(T, b, G, dg, 1)
    dBu = (du * B.permute(3, 0, 1, 2).unsqueeze(3)).reshape(T, b, d, N)  # (T, b, d, N)
    hs = []
    for a_t, bu_t in zip(dA.unbind(0), dBu.unbind(0)):
        h = torch.addcmul(bu_t, a_t, h)
        hs.append(h)
    H = torch.stack(hs, dim=0).reshape(T, b, G, dg, N)
    y = torch.einsum("tbgdn,bgnt->bgdt", H, C).reshape(b, d, T)
    return y, h


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, chunk_size: int = DEFAULT_CHUNK_SIZE, checkpoint_chunks: Optional[bool] = None):
    """Selective scan with mamba-ssm ``selective_scan_ref`` semantics (real A), chunked and memory-light.

    Args:
        u, delta, z: (batch, dim, L). A: (dim, N) real (negative for a stable scan).
        B, C: (batch, G, N, L) grouped (group g serves channels [g*dim/G, (g+1)*dim/G)) or (batch, N, L) shared.
        D, delta_bias: (dim,).
        chunk_size: steps per chunk (the recurrence inside a chunk is a sequential loop); lowered automatically so
            that a chunk's (T, batch, dim, N) temporaries stay below ``MAX_CHUNK_ELEMENTS``.
        checkpoint_chunks: recompute each chunk in backward so that only the chunk-start states are saved
            (default: on whenever autograd records the call).
    Returns:
        out (batch, dim, L) in u's dtype; with ``return_last_state`` also the last state (batch, dim, N) in the
        accumulation dtype (float32, or float64 for float64 inputs), as in mamba's reference.
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    f = _acc_dtype(dtype_in)
    u, delta, A = u.to(f), delta.to(f), A.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bg, Cg = _grouped(B).to(f), _grouped(C).to(f)
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    if checkpoint_chunks is None:
        checkpoint_chunks = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, Bg, Cg))
    chunk_size = max(1, min(int(chunk_size), MAX_CHUNK_ELEMENTS // max(1, batch * dim * A.shape[1])))
    ys = []
    for s in range(0, L, chunk_size):
        e = min(L, s + chunk_size)
        args = (h, u[..., s:e], delta[..., s:e], A, Bg[..., s:e], Cg[..., s:e])
        if checkpoint_chunks:
            y_c, h = _checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y_c, h = _scan_chunk(*args)
        ys.append(y_c)
    y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------------------
# 2D cross scan / merge (VMamba CrossScan / CrossMerge, scans=0)
# ----------------------------------------------------------------------------------------------------------------------
def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): route 0 row-major, 1 column-major, 2 = reverse of 0, 3 = reverse of 1."""
    if x.dim() != 4:
        raise ValueError(f"cross_scan expects (B, C, H, W), got shape {list(x.shape)}")
    r0 = x.flatten(2)
    r1 = x.transpose(2, 3).flatten(2)
    r01 = torch.stack([r0, r1], dim=1)  # (B, 2, C, L)
    return torch.cat([r01, r01.flip(-1)], dim=1)


def _merge_hw(y: torch.Tensor, H: Optional[int], W: Optional[int]) -> Tuple[torch.Tensor, int, int]:
    if y.dim() == 5:
        if y.shape[1] != 4:
            raise ValueError(f"cross_merge expects 4 routes in dim 1, got shape {list(y.shape)}")
        H5, W5 = y.shape[-2:]
        if (H is not None and H != H5) or (W is not None and W != W5):
            raise ValueError(f"cross_merge: H, W = {H}, {W} disagree with the input's spatial shape {H5}x{W5}")
        return y.flatten(3), H5, W5
    if y.dim() != 4 or y.shape[1] != 4:
        raise ValueError(f"cross_merge expects (B, 4, C, H*W) (or (B, 4, C, H, W)), got shape {list(y.shape)}")
    L = y.shape[-1]
    if H is None and W is None:
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"cross_merge: cannot infer H, W from H*W={L} (not a square); pass H= and W=")
        H = W = side
    elif H is None:
        H = L // W
    elif W is None:
        W = L // H
    if H * W != L:
        raise ValueError(f"cross_merge: H*W = {H}*{W} != {L}, the route length of the input")
    return y, H, W


def cross_merge(y: torch.Tensor, H: Optional[int] = None, W: Optional[int] = None) -> torch.Tensor:
    """(B, 4, C, H*W) -> (B, C, H, W): the 4 routes mapped back to row-major positions and summed.

    The exact adjoint of ``cross_scan``: ``<cross_scan(x), y> == <x, cross_merge(y)>``. A square map is inferred when
    H and W are not given; pass ``H``, ``W`` for non-square maps (or give y as (B, 4, C, H, W)).
    """
    y, H, W = _merge_hw(y, H, W)
    Bsz, _, C, L = y.shape
    y02 = y[:, 0:2] + y[:, 2:4].flip(-1)  # (B, 2, C, L): route 0 and 1 with their reverses folded in
    out = y02[:, 0].view(Bsz, C, H, W) + y02[:, 1].view(Bsz, C, W, H).transpose(2, 3)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the fused 4-route op
# ----------------------------------------------------------------------------------------------------------------------
def selective_scan2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """cross_merge(selective_scan over the 4 routes of cross_scan(x)), VMamba SS2D's core (``forward_corev0``).

    x: (B, C, H, W); delta: (B, 4, C, H*W) in route order; A: (4*C, N); B, C: (B, 4, N, H*W) (route k's B/C serve
    route k's channels); D, delta_bias: (4*C,). Returns (B, C, H, W) in x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"selective_scan2d: x must be (B, C, H, W), got shape {list(x.shape)}")
    Bsz, Ch, H, W = x.shape
    L = H * W
    if delta.shape != (Bsz, 4, Ch, L):
        raise ValueError(f"selective_scan2d: delta must be (B, 4, C, H*W)={(Bsz, 4, Ch, L)}, got {list(delta.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != Bsz or t.shape[1] != 4 or t.shape[-1] != L:
            raise ValueError(f"selective_scan2d: {name} must be (B, 4, N, H*W), got shape {list(t.shape)}")
    xs = cross_scan(x).reshape(Bsz, 4 * Ch, L)
    ys = selective_scan(xs, delta.reshape(Bsz, 4 * Ch, L), A, B, C, D, None, delta_bias, delta_softplus,
                        chunk_size=chunk_size)
    return cross_merge(ys.view(Bsz, 4, Ch, L), H, W)

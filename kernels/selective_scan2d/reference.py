"""Plain-PyTorch reference of the ViM2 / VMamba 2D selective scan (the oracle for the Triton kernels).

Pieces (all differentiable by autograd):

* ``selective_scan`` -- the semantics of mamba-ssm's ``selective_scan_ref`` (state-spaces/mamba,
  ``mamba_ssm/ops/selective_scan_interface.py``), real A only, computed with a chunked scan: the sequence is cut into
  chunks of ``chunk_size`` steps; each chunk runs the recurrence over its (T, B, D, N) slab and passes its last state
  on. Under autograd a custom ``autograd.Function`` saves only the (B, D, N) state at each chunk start and its
  hand-written backward walks the chunks in reverse (recompute the chunk's states, adjoint recurrence, reductions),
  so nothing of size (B, D, L, N) is ever alive. ``selective_scan_backward`` / ``selective_scan2d_backward`` give the
  same gradients without autograd. Float32 accumulation whatever the input dtype (float64 stays float64).
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

__all__ = ["selective_scan", "selective_scan_backward", "selective_scan_ref_naive", "cross_scan", "cross_merge",
           "selective_scan2d", "selective_scan2d_backward", "DEFAULT_CHUNK_SIZE"]

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
    if delta is not None and delta.shape != u.shape:  # None: the caller checked it (a low-rank delta)
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


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D, z, dtype_out: torch.dtype) -> torch.Tensor:
    """The scan output's epilogue in u's (accumulation) dtype: y + D * u, times silu(z), cast to ``dtype_out``."""
    f = u.dtype
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(dtype_out)


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
    out = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z, dtype_in)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------------------
# the reference: chunked scan with a hand-written chunked backward
# ----------------------------------------------------------------------------------------------------------------------
def _chunk_len(batch: int, dim: int, N: int, chunk_size: Optional[int]) -> int:
    """Steps per chunk: ``chunk_size`` (default ``DEFAULT_CHUNK_SIZE``), lowered so that one chunk's (T, batch, dim, N)
    work tensors stay below ``MAX_CHUNK_ELEMENTS`` elements."""
    T = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    return max(1, min(T, MAX_CHUNK_ELEMENTS // max(1, batch * dim * N)))


def _chunk_terms(u, delta, A, B, T0: int, T1: int):
    """Step-major terms of steps [T0, T1), each computed for the whole chunk in one vectorized call: delta (T, b, d),
    a = exp(delta A) (T, b, d, N), delta*u (T, b, d), B_t (T, b, G, N), bu = delta u B (T, b, d, N) (fresh tensors,
    free to be overwritten)."""
    b, d, _ = u.shape
    G, N = B.shape[1], B.shape[2]
    dl = delta[..., T0:T1].permute(2, 0, 1)
    T = dl.shape[0]
    a = _outer(dl.unsqueeze(-1), A).exp_()
    du = dl * u[..., T0:T1].permute(2, 0, 1)
    Bt = B[..., T0:T1].permute(3, 0, 1, 2)
    bu = _outer(du.reshape(T, b, G, d // G, 1), Bt.unsqueeze(3)).view(T, b, d, N)
    return dl, a, du, Bt, bu


def _outer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y (broadcast) into a fresh contiguous tensor: the big per-chunk terms are walked step by step and viewed
    as batched matrices, which needs the (T, ...) step-major layout whatever the inputs' strides."""
    if _recording(x, y):  # autograd through the chunk loop (checkpoint_chunks=False): out= is not differentiable
        return (x * y).contiguous()
    return torch.mul(x, y, out=x.new_empty(torch.broadcast_shapes(x.shape, y.shape)))


def _recording(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _run_chunk_(h: torch.Tensor, a: torch.Tensor, bu: torch.Tensor) -> torch.Tensor:
    """The recurrence over one chunk from state h, written in place into bu: returns bu holding the (T, b, d, N)
    states (one fused multiply-add per step, no per-step allocation and no stack copy)."""
    if _recording(h, a, bu):  # autograd through the loop (checkpoint_chunks=False): the out-of-place form
        hs = []
        for a_t, bu_t in zip(a.unbind(0), bu.unbind(0)):
            h = torch.addcmul(bu_t, a_t, h)
            hs.append(h)
        return torch.stack(hs, 0)
    prev = h
    for a_t, h_t in zip(a.unbind(0), bu.unbind(0)):
        prev = h_t.addcmul_(a_t, prev)
    return bu


def _group_contract(X: torch.Tensor, V: torch.Tensor, G: int) -> torch.Tensor:
    """sum over N: X (T, b, d, N), V (T, b, G, N) -> (T, b, d) (a batched vector-matrix product over X^T; measured
    several times faster on CPU than X @ V, with no copy of X)."""
    T, b, d, N = X.shape
    return torch.matmul(V.reshape(T * b * G, 1, N), X.reshape(T * b * G, d // G, N).transpose(1, 2)).view(T, b, d)


def _group_reduce(W: torch.Tensor, X: torch.Tensor, G: int) -> torch.Tensor:
    """sum over a group's channels: W (T, b, d), X (T, b, d, N) -> (T, b, G, N) (batched vector-matrix product)."""
    T, b, d, N = X.shape
    return torch.matmul(W.reshape(T * b * G, 1, d // G), X.reshape(T * b * G, d // G, N)).view(T, b, G, N)


def _scan_forward(u, delta, A, B, C, T: int, save_states: bool):
    """Chunked forward (no autograd). Returns y (b, d, L), the last state and the chunk-start states (or None)."""
    b, d, L = u.shape
    G = B.shape[1]
    h = u.new_zeros(b, d, A.shape[1])
    y = u.new_empty(b, d, L)
    starts = []
    for s in range(0, L, T):
        e = min(L, s + T)
        if save_states:
            starts.append(h)
        _, a, _, _, bu = _chunk_terms(u, delta, A, B, s, e)
        H = _run_chunk_(h, a, bu)
        y[..., s:e] = _group_contract(H, C[..., s:e].permute(3, 0, 1, 2), G).permute(1, 2, 0)
        h = H[-1].clone()  # a view would keep the chunk's (T, b, d, N) buffer alive
    return y, h, (torch.stack(starts, 0) if save_states else None)


class _ChunkedScan(torch.autograd.Function):
    """y = <C, h> of the recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (delta already biased /
    softplused; D, z outside), with a chunked backward.

    Forward saves only the (b, d, N) state at each chunk start. Backward walks the chunks in reverse: it recomputes the
    chunk's states from its start state, runs the adjoint ``lam_t = C_t gy_t + a_{t+1} lam_{t+1}`` from the carried
    ``mu = a_start lam_start`` of the later chunk, and forms every gradient with a few reductions over the chunk:
    ``dC_t = sum_d gy h``, ``dB_t = sum_d lam delta u``, ``du = delta sum_n lam B``,
    ``ddelta = u sum_n lam B + sum_n lam A a h_{t-1}``, ``dA = sum lam delta a h_{t-1}``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, T: int):
        y, h, starts = _scan_forward(u, delta, A, B, C, T, save_states=True)
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.T = T
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        u, delta, A, B, C, starts = ctx.saved_tensors
        return _scan_backward(u, delta, A, B, C, starts, ctx.T, gy, gh) + (None,)


def _scan_backward(u, delta, A, B, C, starts, T: int, gy, gh):
    """Gradients (du, ddelta, dA, dB, dC) of the core scan (see ``_ChunkedScan``) from the chunk-start states.

    Per chunk every (T, b, d, N) term is formed by one vectorized call over the chunk and reused in place: the states H
    overwrite bu, the adjoint overwrites gy C, ``M_t = a_t lam_t`` overwrites a, and ``M_t h_{t-1}`` (= lam_t a_t
    h_{t-1}, the dA / ddelta term) overwrites M.
    """
    b, d, L = u.shape
    G, N = B.shape[1], B.shape[2]
    dg = d // G
    gy = torch.zeros_like(u) if gy is None else gy.contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dA = torch.zeros_like(A)
    mu = torch.zeros(b, d, N, dtype=u.dtype, device=u.device) if gh is None else gh.to(u.dtype)
    chunks = list(range(0, L, T))
    for i in reversed(range(len(chunks))):
        s = chunks[i]
        e = min(L, s + T)
        Tc = e - s
        dl, a, duu, Bt, bu = _chunk_terms(u, delta, A, B, s, e)
        h0 = starts[i]
        H = _run_chunk_(h0, a, bu)  # (Tc, b, d, N), in bu
        gyt = gy[..., s:e].permute(2, 0, 1)  # (Tc, b, d)
        Ct = C[..., s:e].permute(3, 0, 1, 2)  # (Tc, b, G, N)
        Lam = _outer(gyt.reshape(Tc, b, G, dg, 1), Ct.unsqueeze(3)).view(Tc, b, d, N)  # gy C, becomes the adjoint
        Lam_t = Lam.unbind(0)
        a_t = a.unbind(0)
        nxt = Lam_t[-1].add_(mu)
        for t in range(Tc - 2, -1, -1):
            nxt = Lam_t[t].addcmul_(a_t[t + 1], nxt)
        M = a.mul_(Lam)  # M_t = a_t lam_t
        mu = M[0].clone()  # the adjoint carried into the previous chunk
        M[1:].mul_(H[:-1])  # lam_t a_t h_{t-1}
        M[0].mul_(h0)
        lamB = _group_contract(Lam, Bt, G)  # (Tc, b, d)
        dC[..., s:e] = _group_reduce(gyt, H, G).permute(1, 2, 3, 0)
        dB[..., s:e] = _group_reduce(duu, Lam, G).permute(1, 2, 3, 0)
        dA += (M * dl.unsqueeze(-1)).sum((0, 1))  # (einsum / bmm here permute M: ~10x slower on CPU)
        ddelta[..., s:e] = (u[..., s:e].permute(2, 0, 1) * lamB + (M * A).sum(-1)).permute(1, 2, 0)
        du[..., s:e] = (dl * lamB).permute(1, 2, 0)
    return du, ddelta, dA, dB, dC


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Accumulation-dtype copies; delta biased / softplused; B, C at one group count."""
    f = _acc_dtype(u.dtype)
    u, delta, A = u.to(f), delta.to(f), A.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    delta_pre = delta
    if delta_softplus:
        delta = F.softplus(delta)
    Bg, Cg = _grouped(B).to(f), _grouped(C).to(f)
    if Bg.shape[1] != Cg.shape[1]:  # different group counts: run at the common refinement
        G = math.lcm(Bg.shape[1], Cg.shape[1])
        Bg, Cg = Bg.repeat_interleave(G // Bg.shape[1], 1), Cg.repeat_interleave(G // Cg.shape[1], 1)
    return u, delta, delta_pre, A, Bg, Cg


def _fold_groups(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gradient at the refined group count -> the input's own layout ((batch, N, L) or (batch, Gt, N, L))."""
    Gt = 1 if like.dim() == 3 else like.shape[1]
    g = g.unflatten(1, (Gt, g.shape[1] // Gt)).sum(2)
    return g.squeeze(1) if like.dim() == 3 else g


def selective_scan_backward(g, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            chunk_size: Optional[int] = None):
    """Every input gradient of ``selective_scan`` for the upstream gradient g, without autograd (usable where autograd
    does not record, e.g. inside a custom op): (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None for absent inputs,
    each in its input's dtype."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    uf, dl, dl_pre, Af, Bg, Cg = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    f = uf.dtype
    batch, dim, L = u.shape
    T = _chunk_len(batch, dim, A.shape[1], chunk_size)
    y, _, starts = _scan_forward(uf, dl, Af, Bg, Cg, T, save_states=True)
    g = g.to(f)
    dz = None
    if D is not None:
        y = y + uf * D.to(f)[:, None]
    if z is not None:
        zf = z.to(f)
        sz = torch.sigmoid(zf)
        dz = g * y * sz * (1 + zf * (1 - sz))
        g = g * zf * sz
    du, ddl, dA, dB, dC = _scan_backward(uf, dl, Af, Bg, Cg, starts, T, g, None)
    dD = None
    if D is not None:
        du = du + g * D.to(f)[:, None]
        dD = (g * uf).sum((0, 2))
    if delta_softplus:
        ddl = ddl * torch.sigmoid(dl_pre)
    dbias = ddl.sum((0, 2)) if delta_bias is not None else None
    dB, dC = _fold_groups(dB, B), _fold_groups(dC, C)
    outs = (du, ddl, dA, dB, dC, dD, dz, dbias)
    ins = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(None if o is None else o.to(t.dtype) for o, t in zip(outs, ins))


def selective_scan2d_backward(g, x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                              chunk_size: Optional[int] = None):
    """Every input gradient of ``selective_scan2d`` without autograd: (dx, ddelta, dA, dB, dC, dD, ddelta_bias)."""
    Bsz, Ch, H, W = x.shape
    L = H * W
    xs = cross_scan(x).reshape(Bsz, 4 * Ch, L)
    gs = cross_scan(g).reshape(Bsz, 4 * Ch, L)  # the adjoint of cross_merge is cross_scan
    du, ddl, dA, dB, dC, dD, _, dbias = selective_scan_backward(
        gs, xs, delta.reshape(Bsz, 4 * Ch, L), A, B, C, D, None, delta_bias, delta_softplus, chunk_size)
    dx = cross_merge(du.view(Bsz, 4, Ch, L), H, W)  # the adjoint of cross_scan
    return dx, ddl.view(delta.shape), dA, dB, dC, dD, dbias


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, chunk_size: Optional[int] = None,
                   checkpoint_chunks: Optional[bool] = None):
    """Selective scan with mamba-ssm ``selective_scan_ref`` semantics (real A), chunked and memory-light.

    Args:
        u, delta, z: (batch, dim, L). A: (dim, N) real (negative for a stable scan).
        B, C: (batch, G, N, L) grouped (group g serves channels [g*dim/G, (g+1)*dim/G)) or (batch, N, L) shared
            (B and C may have different group counts).
        D, delta_bias: (dim,).
        chunk_size: steps per chunk (default ``DEFAULT_CHUNK_SIZE``); lowered automatically so that a chunk's
            (T, batch, dim, N) temporaries stay below ``MAX_CHUNK_ELEMENTS``.
        checkpoint_chunks: ``None`` / ``True`` (default): the chunked backward of ``_ChunkedScan`` (saves only the
            chunk-start states). ``False``: plain autograd through the chunk loop (saves every chunk's states; a
            cross-check of the hand-written backward, not for large inputs).
    Returns:
        out (batch, dim, L) in u's dtype; with ``return_last_state`` also the last state (batch, dim, N) in the
        accumulation dtype (float32, or float64 for float64 inputs), as in mamba's reference.
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, _, A, Bg, Cg = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, L = u.shape
    T = _chunk_len(batch, dim, A.shape[1], chunk_size)
    if checkpoint_chunks is False or not (torch.is_grad_enabled() and any(
            t.requires_grad for t in (u, delta, A, Bg, Cg))):
        y, h, _ = _scan_forward(u, delta, A, Bg, Cg, T, save_states=False)
    else:
        y, h = _ChunkedScan.apply(u, delta, A, Bg, Cg, T)
    out = _skip_and_gate(y, u, D, z, dtype_in)
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


def map_to_routes(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(b, 4, X, H*W) per-route tensors in map order (row-major positions) -> the same in route order: route r's
    step t holds the value at route r's t-th position (``cross_scan`` applied to slice r for every r)."""
    b, R, X, L = t.shape
    r0 = t[:, 0::2]  # routes 0, 2 read row-major
    r1 = t[:, 1::2].unflatten(-1, (H, W)).transpose(-1, -2).flatten(-2)  # routes 1, 3 read column-major
    fwd = torch.stack([r0[:, 0], r1[:, 0]], dim=1)
    rev = torch.stack([r0[:, 1], r1[:, 1]], dim=1).flip(-1)
    return torch.cat([fwd, rev], dim=1)


def routes_to_map(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of ``map_to_routes``: (b, 4, X, H*W) in route order -> map order (per route, no sum)."""
    fwd, rev = t[:, :2], t[:, 2:].flip(-1)
    r0 = torch.stack([fwd[:, 0], rev[:, 0]], dim=1)
    r1 = torch.stack([fwd[:, 1], rev[:, 1]], dim=1).unflatten(-1, (W, H)).transpose(-1, -2).flatten(-2)
    return torch.stack([r0[:, 0], r1[:, 0], r0[:, 1], r1[:, 1]], dim=1)


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
def selective_scan2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                     chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE):
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

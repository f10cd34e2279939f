"""Triton kernels of ``strip_mix`` (forward, dweight/dbias; dx reuses the forward kernel).

Per (batch, raft ``co``) the op is a small GEMM ``out[f, p] = sum_r W[g, f, r] * X[r, p]`` where the reduction index
``r = (j * L + l) * K + k`` runs over the raft's channels ``j``, the positions ``l`` along the mixing axis and the
window ``k`` across it, and ``p`` over the positions across the axis. ``X[r, p] = x[b, j*M + co, l, p + k - K//2]``
is **gathered straight from ``x`` through its strides** (any layout: NCHW, channels-last, transposed views), so no
permuted/transposed copy of the activations is ever made; the output is written straight into NCHW at
``out[b, jo*M + co, lo, p]`` (``f = jo * L + lo``). ``axis`` only swaps which strides play L and P.

* forward: grid (B * M, cdiv(F_out, BF), cdiv(P, BP)); ``tl.dot`` over BR-chunks of the reduction; bias fused.
* dx: the forward kernel on ``grad_out`` with the transposed, window-flipped weight (a tiny weight copy) and
  raft size r_out.
* dweight (+ dbias): grid (G, cdiv(F_out, BF), cdiv(R, BR)); reduction over n = (b, q, p) with co = q * G + g, both
  operands gathered through strides; the r-block 0 programs also reduce dbias.

Accumulation is fp32 (``input_precision="ieee"`` for fp32 inputs unless TF32 matmuls are enabled in torch).
No autotuning (the interpreter path must stay cheap); block sizes follow the problem size.
"""
import os

import torch
import triton
import triton.language as tl

__all__ = ["strip_mix_fwd_triton", "strip_mix_bwd_triton"]


@triton.jit
def _span(start, BLOCK: tl.constexpr, n):
    """Offsets ``start .. start + BLOCK - 1`` of one block along an axis of length n, and their in-range mask."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _split_r(offs_r, L, K: tl.constexpr):
    """Reduction index r = (j * L + l) * K + k -> (raft channel j, position l along the axis, window tap k)."""
    j = offs_r // (L * K)
    rem = offs_r % (L * K)
    return j, rem // K, rem % K


@triton.jit
def _dot_acc(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b into the fp32 accumulator: IEEE fp32 products (no TF32) if IEEE, operands cast to fp32 first if
    UPCAST."""
    if UPCAST:  # the CPU interpreter's bf16 tl.dot is wrong: compute in fp32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _strip_mix_fwd_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        M, G, L, P, FO, RK,
        sxb, sxc, sxl, sxp,
        sob, soc, sol, sop,
        K: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BF: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
):
    pid_bm = tl.program_id(0).to(tl.int64)
    b = pid_bm // M
    co = pid_bm % M
    g = co % G
    offs_f, mask_f = _span(tl.program_id(1) * BF, BF, FO)
    offs_p, mask_p = _span(tl.program_id(2) * BP, BP, P)
    acc = tl.zeros((BF, BP), dtype=tl.float32)
    w_base = w_ptr + g * FO * RK
    x_base = x_ptr + b * sxb + co * sxc
    for r0 in range(0, RK, BR):
        offs_r, mask_r = _span(r0, BR, RK)
        j, l_idx, k_idx = _split_r(offs_r, L, K)
        w = tl.load(w_base + offs_f[:, None] * RK + offs_r[None, :],
                    mask=mask_f[:, None] & mask_r[None, :], other=0.)
        src_p = offs_p[None, :] + k_idx[:, None] - PAD
        mx = mask_r[:, None] & mask_p[None, :] & (src_p >= 0) & (src_p < P)
        xv = tl.load(x_base + (j * M)[:, None] * sxc + l_idx[:, None] * sxl + src_p * sxp, mask=mx, other=0.)
        acc = _dot_acc(acc, w, xv, IEEE, UPCAST)
    if HAS_BIAS:
        bias = tl.load(b_ptr + g * FO + offs_f, mask=mask_f, other=0.).to(tl.float32)
        acc += bias[:, None]
    jo = offs_f // L
    lo = offs_f % L
    o_ptrs = out_ptr + b * sob + (jo * M + co)[:, None] * soc + lo[:, None] * sol + offs_p[None, :] * sop
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_f[:, None] & mask_p[None, :])


@triton.jit
def _strip_mix_dw_kernel(
        x_ptr, dy_ptr, dw_ptr, db_ptr,
        M, G, L, P, FO, RK, N, Q,
        sxb, sxc, sxl, sxp,
        syb, syc, syl, syp,
        K: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BF: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs_f, mask_f = _span(tl.program_id(1) * BF, BF, FO)
    offs_r, mask_r = _span(tl.program_id(2) * BR, BR, RK)
    jo = offs_f // L
    lo = offs_f % L
    j, l_idx, k_idx = _split_r(offs_r, L, K)
    acc = tl.zeros((BF, BR), dtype=tl.float32)
    dbacc = tl.zeros((BF,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n, mask_n = _span(n0, BN, N)
        bb = (offs_n // (Q * P)).to(tl.int64)
        q = (offs_n // P) % Q
        p = offs_n % P
        co = q * G + g
        dy = tl.load(dy_ptr + bb[None, :] * syb + (jo[:, None] * M + co[None, :]) * syc + lo[:, None] * syl
                     + p[None, :] * syp, mask=mask_f[:, None] & mask_n[None, :], other=0.)
        src_p = p[:, None] + k_idx[None, :] - PAD
        mx = mask_n[:, None] & mask_r[None, :] & (src_p >= 0) & (src_p < P)
        xv = tl.load(x_ptr + bb[:, None] * sxb + (j[None, :] * M + co[:, None]) * sxc + l_idx[None, :] * sxl
                     + src_p * sxp, mask=mx, other=0.)
        acc = _dot_acc(acc, dy, xv, IEEE, UPCAST)
        if HAS_BIAS:
            dbacc += tl.sum(dy.to(tl.float32), axis=1)
    tl.store(dw_ptr + g * FO * RK + offs_f[:, None] * RK + offs_r[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=mask_f[:, None] & mask_r[None, :])
    if HAS_BIAS:
        if tl.program_id(2) == 0:  # the r-block 0 programs own dbias
            tl.store(db_ptr + g * FO + offs_f, dbacc.to(db_ptr.dtype.element_ty), mask=mask_f)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block(n: int, cap: int) -> int:
    if _interpret():
        cap = 16  # the CPU interpreter is slow: keep tiles minimal
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 or dtype == torch.float64


def _upcast(dtype: torch.dtype) -> bool:
    return _interpret() and dtype in (torch.bfloat16, torch.float16)


def _axis_strides(t: torch.Tensor, axis: str):
    sb, sc, sh, sw = t.stride()
    return (sb, sc, sh, sw) if axis == "h" else (sb, sc, sw, sh)


def strip_mix_fwd_triton(x, weight, bias, axis: str, raft_size: int, out_dtype=None):
    B, C, H, W = x.shape
    L, P = (H, W) if axis == "h" else (W, H)
    G, FO, FI, K = weight.shape
    M = C // raft_size
    r_out = FO // L
    weight = weight.contiguous()
    out = torch.empty((B, r_out * M, H, W), device=x.device, dtype=out_dtype or x.dtype)
    if out.numel() == 0:
        return out
    RK = FI * K
    BF, BP, BR = _block(FO, 64), _block(P, 64), _block(RK, 32)
    grid = (B * M, triton.cdiv(FO, BF), triton.cdiv(P, BP))
    bias_arg = bias.contiguous() if bias is not None else weight
    _strip_mix_fwd_kernel[grid](
        x, weight, bias_arg, out,
        M, G, L, P, FO, RK,
        *_axis_strides(x, axis), *_axis_strides(out, axis),
        K=K, PAD=K // 2, HAS_BIAS=bias is not None, IEEE=_ieee(x.dtype), UPCAST=_upcast(x.dtype),
        BF=BF, BP=BP, BR=BR,
    )
    return out


def strip_mix_bwd_triton(grad_out, x, weight, has_bias: bool, axis: str, raft_size: int):
    B, C, H, W = x.shape
    L, P = (H, W) if axis == "h" else (W, H)
    G, FO, FI, K = weight.shape
    M = C // raft_size
    r_out = FO // L
    Q = M // G
    # dx: forward kernel with the transposed + window-flipped weight
    w_t = weight.transpose(1, 2).flip(3).contiguous()
    dx = strip_mix_fwd_triton(grad_out, w_t, None, axis, r_out)
    RK = FI * K
    N = B * Q * P
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    db = torch.zeros((G, FO), device=weight.device, dtype=weight.dtype)
    if N == 0:
        dw.zero_()
        return dx, dw, db
    BF, BR, BN = _block(FO, 64), _block(RK, 64), _block(N, 32)
    grid = (G, triton.cdiv(FO, BF), triton.cdiv(RK, BR))
    _strip_mix_dw_kernel[grid](
        x, grad_out, dw, db,
        M, G, L, P, FO, RK, N, Q,
        *_axis_strides(x, axis), *_axis_strides(grad_out, axis),
        K=K, PAD=K // 2, HAS_BIAS=has_bias, IEEE=_ieee(x.dtype), UPCAST=_upcast(x.dtype),
        BF=BF, BR=BR, BN=BN,
    )
    return dx, dw, (db if has_bias else None)

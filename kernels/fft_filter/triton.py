"""Triton kernels of the ``fft_filter`` op (AFFNet adaptive frequency filter).

Two paths, chosen per call by :func:`use_fused` from the padded tile size:

* **fused** (classification map sizes, e.g. 7x7 .. 16x16): one program per (batch, channel group) owns the whole
  ``bs x H x W`` tile. The 2-D real FFT is done as small matmuls with precomputed ortho DFT matrices
  (``rfft2 = F_H . (x . F_W)``), then the block-diagonal complex filter MLP (``tl.dot`` over channels), activation,
  softshrink, the complex product with the same spectrum, the inverse DFT along H and the c2r DFT along W (weights
  1 for DC, 2 for 1..ceil(W/2)-1, 1 for Nyquist; the imaginary parts of DC/Nyquist drop out because their sine
  rows are zero). The spectrum never leaves registers. The backward (the same kernel specialised with
  ``BWD=True``) recomputes the forward in the same program and applies the transposed real matrices (every step is
  real-linear except the MLP nonlinearities), so it produces dx and per-(batch, group) partial weight gradients that
  the wrapper sums over the batch.
* **spectral** (large maps, e.g. detection): cuFFT via ``torch.fft.rfft2`` / ``irfft2`` around one Triton kernel
  that computes filter MLP + softshrink + complex multiply per block of frequency bins. Its backward is
  recompute-based: ``reference.fft_filter_reference_backward`` (torch.fft + the analytic adjoint of the filter MLP,
  float32), checked against the reference in tests.

All accumulation is float32 regardless of the input dtype (bf16/fp16 inputs are loaded and cast in the kernel);
``tl.dot`` uses ``input_precision="ieee"`` for parity with the official fp32 code (no TF32).
Tile dims are padded to powers of two >= 16 (``tl.dot`` minimum); padded DFT rows/columns are zero so padding never
leaks into the result.
"""
import math
from functools import lru_cache
from typing import Tuple

import torch
import triton
import triton.language as tl

from .reference import fft_filter_reference_backward

__all__ = ["fft_filter_fwd", "fft_filter_bwd", "use_fused", "dft_matrices", "FUSED_MAX_TILE"]

ACT_IDS = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3}
# largest padded BS*BH*BWF tile (complex elements) handled by the fused path; above it the spectral path runs
FUSED_MAX_TILE = 16384


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def use_fused(C: int, H: int, W: int, num_groups: int, hidden: int) -> bool:
    bs = C // num_groups
    return max(_p2(bs), _p2(hidden)) * _p2(H) * _p2(W // 2 + 1) <= FUSED_MAX_TILE and _p2(H) * _p2(W) <= 4096


@lru_cache(maxsize=64)
def _dft_cached(H: int, W: int, device: str) -> Tuple[torch.Tensor, ...]:
    Wf = W // 2 + 1
    h = torch.arange(H, dtype=torch.float64)
    w = torch.arange(W, dtype=torch.float64)
    f = torch.arange(Wf, dtype=torch.float64)
    ang_w = 2 * math.pi * torch.outer(w, f) / W                    # (W, Wf)
    fwr = torch.cos(ang_w) / math.sqrt(W)
    fwi = -torch.sin(ang_w) / math.sqrt(W)
    ang_h = 2 * math.pi * torch.outer(h, h) / H                    # (H, H), symmetric
    fhr = torch.cos(ang_h) / math.sqrt(H)
    fhi = -torch.sin(ang_h) / math.sqrt(H)
    coef = torch.full((Wf,), 2.0, dtype=torch.float64)
    coef[0] = 1.0
    if W % 2 == 0:
        coef[-1] = 1.0
    gwr = (coef[:, None] * torch.cos(ang_w.T)) / math.sqrt(W)      # (Wf, W)
    gwi = (coef[:, None] * torch.sin(ang_w.T)) / math.sqrt(W)
    out = [t.to(device=device, dtype=torch.float32).contiguous() for t in (fwr, fwi, fhr, fhi, gwr, gwi)]
    return tuple(out)


def dft_matrices(H: int, W: int, device) -> Tuple[torch.Tensor, ...]:
    """(FWr, FWi) (W, Wf), (FHr, FHi) (H, H), (GWr, GWi) (Wf, W): ortho DFT / c2r matrices in float32."""
    return _dft_cached(H, W, str(torch.device(device)))


@triton.jit
def _act_fwd(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = x / (1.0 + tl.exp(-x))  # silu (no tl.sigmoid, see _rowsum)
    elif ACT == 3:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx."""
    if ACT == 0:
        g = tl.full(x.shape, 1.0, tl.float32)
    elif ACT == 1:
        g = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 2:
        s = 1.0 / (1.0 + tl.exp(-x))
        g = s * (1.0 + x * (1.0 - s))
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        g = cdf + x * pdf
    return g


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rowsum(x):
    # tl.reduce with our own combine fn instead of tl.sum: the jit functions of triton.language.standard
    # (tl.sum, tl.sigmoid) fail under TRITON_INTERPRET=1 once triton was imported in compiled mode in the same process
    return tl.reduce(x, 1, _add)


@triton.jit
def _softshrink(x, lam):
    return tl.where(x > lam, x - lam, tl.where(x < -lam, x + lam, 0.0))


@triton.jit
def _load_mat(ptr, R, K, BR: tl.constexpr, BK: tl.constexpr):
    r = tl.arange(0, BR)
    k = tl.arange(0, BK)
    return tl.load(ptr + r[:, None] * K + k[None, :], mask=(r[:, None] < R) & (k[None, :] < K), other=0.0)


@triton.jit
def _load_wT(ptr, g, I, O, G, BO: tl.constexpr, BI: tl.constexpr):
    """W^T[o, i] = w[part, g, i, o] for a weight slice starting at ``ptr`` (part already applied)."""
    o = tl.arange(0, BO)
    i = tl.arange(0, BI)
    return tl.load(ptr + g * I * O + i[None, :] * O + o[:, None], mask=(o[:, None] < O) & (i[None, :] < I), other=0.0)


@triton.jit
def _load_vec(ptr, g, N, BN: tl.constexpr):
    n = tl.arange(0, BN)
    return tl.load(ptr + g * N + n, mask=n < N, other=0.0)


@triton.jit
def _bdot(a2, b3, BS: tl.constexpr, PREC: tl.constexpr):
    """Batched (BS, M, K) @ (BS, K, N) with the same 2-D left matrix for every channel."""
    a3 = tl.broadcast_to(a2[None, :, :], (BS, a2.shape[0], a2.shape[1]))
    return tl.dot(a3, b3, input_precision=PREC)


@triton.jit
def _load_mlp(w1_ptr, b1_ptr, w2_ptr, b2_ptr, g, G, bs, bsh, BS: tl.constexpr, BSH: tl.constexpr):
    """Group g's filter MLP: transposed complex weights and biases (real parts, imaginary parts one part later)."""
    w1rT = _load_wT(w1_ptr, g, bs, bsh, G, BSH, BS)
    w1iT = _load_wT(w1_ptr + G * bs * bsh, g, bs, bsh, G, BSH, BS)
    w2rT = _load_wT(w2_ptr, g, bsh, bs, G, BS, BSH)
    w2iT = _load_wT(w2_ptr + G * bs * bsh, g, bsh, bs, G, BS, BSH)
    b1r = _load_vec(b1_ptr, g, bsh, BSH)
    b1i = _load_vec(b1_ptr + G * bsh, g, bsh, BSH)
    b2r = _load_vec(b2_ptr, g, bs, BS)
    b2i = _load_vec(b2_ptr + G * bs, g, bs, BS)
    return w1rT, w1iT, w2rT, w2iT, b1r, b1i, b2r, b2i


@triton.jit
def _filter_mlp(xr, xi, w1rT, w1iT, b1r, b1i, w2rT, w2iT, b2r, b2i, lam, ACT: tl.constexpr, PREC: tl.constexpr):
    """Complex block-diagonal MLP over channels (W^T @ X) and softshrink of a (channels, bins) spectrum block:
    returns the hidden pre- / post-activation, the output and the filter mask M (real, imaginary each)."""
    h1r = tl.dot(w1rT, xr, input_precision=PREC) - tl.dot(w1iT, xi, input_precision=PREC) + b1r[:, None]
    h1i = tl.dot(w1rT, xi, input_precision=PREC) + tl.dot(w1iT, xr, input_precision=PREC) + b1i[:, None]
    o1r = _act_fwd(h1r, ACT)
    o1i = _act_fwd(h1i, ACT)
    o2r = tl.dot(w2rT, o1r, input_precision=PREC) - tl.dot(w2iT, o1i, input_precision=PREC) + b2r[:, None]
    o2i = tl.dot(w2rT, o1i, input_precision=PREC) + tl.dot(w2iT, o1r, input_precision=PREC) + b2i[:, None]
    mr = _softshrink(o2r, lam)
    mi = _softshrink(o2i, lam)
    return h1r, h1i, o1r, o1i, o2r, o2i, mr, mi


@triton.jit
def _fused_forward_math(x3, fwr, fwi, fhr, fhi, w1rT, w1iT, b1r, b1i, w2rT, w2iT, b2r, b2i, lam,
                        BS: tl.constexpr, BSH: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                        BWF: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr):
    # rfft along W: (BS*BH, BW) @ (BW, BWF)
    a = tl.reshape(x3, (BS * BH, BW))
    tr = tl.reshape(tl.dot(a, fwr, input_precision=PREC), (BS, BH, BWF))
    ti = tl.reshape(tl.dot(a, fwi, input_precision=PREC), (BS, BH, BWF))
    # full DFT along H (per channel)
    xr = _bdot(fhr, tr, BS, PREC) - _bdot(fhi, ti, BS, PREC)
    xi = _bdot(fhr, ti, BS, PREC) + _bdot(fhi, tr, BS, PREC)
    xr = tl.reshape(xr, (BS, BH * BWF))
    xi = tl.reshape(xi, (BS, BH * BWF))
    h1r, h1i, o1r, o1i, o2r, o2i, mr, mi = _filter_mlp(xr, xi, w1rT, w1iT, b1r, b1i, w2rT, w2iT, b2r, b2i, lam,
                                                       ACT, PREC)
    return xr, xi, h1r, h1i, o1r, o1i, o2r, o2i, mr, mi


@triton.jit
def _fft_filter_fused_kernel(
        x_ptr, gy_ptr, out_ptr, fwr_ptr, fwi_ptr, fhr_ptr, fhi_ptr, gwr_ptr, gwi_ptr,
        w1_ptr, b1_ptr, w2_ptr, b2_ptr,
        dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
        G, bs, bsh, H, W, Wf,
        sxb, sxc, sxh, sxw,
        sgb, sgc, sgh, sgw,
        lam,
        BS: tl.constexpr, BSH: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BWF: tl.constexpr,
        ACT: tl.constexpr, PREC: tl.constexpr, BWD: tl.constexpr,
):
    """One program per (batch, group) tile; the forward math is shared by both directions (the backward recomputes it).

    BWD=False: out = the filter output. BWD=True: out = dx for the upstream gradient gy, and the partial weight
    gradients of this (batch, group) go to dw1 / db1 / dw2 / db2 (gy and those pointers are unused by the forward).
    """
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    c = tl.arange(0, BS)
    hh = tl.arange(0, BH)
    ww = tl.arange(0, BW)
    c3 = c[:, None, None]
    h3 = hh[None, :, None]
    w3 = ww[None, None, :]
    mask3 = (c3 < bs) & (h3 < H) & (w3 < W)
    x3 = tl.load(x_ptr + b * sxb + (g * bs + c3) * sxc + h3 * sxh + w3 * sxw, mask=mask3, other=0.0).to(tl.float32)
    if BWD:
        g3 = tl.load(gy_ptr + b * sgb + (g * bs + c3) * sgc + h3 * sgh + w3 * sgw, mask=mask3,
                     other=0.0).to(tl.float32)

    fwr = _load_mat(fwr_ptr, W, Wf, BW, BWF)
    fwi = _load_mat(fwi_ptr, W, Wf, BW, BWF)
    fhr = _load_mat(fhr_ptr, H, H, BH, BH)
    fhi = _load_mat(fhi_ptr, H, H, BH, BH)
    gwr = _load_mat(gwr_ptr, Wf, W, BWF, BW)
    gwi = _load_mat(gwi_ptr, Wf, W, BWF, BW)
    w1rT, w1iT, w2rT, w2iT, b1r, b1i, b2r, b2i = _load_mlp(w1_ptr, b1_ptr, w2_ptr, b2_ptr, g, G, bs, bsh, BS, BSH)

    xr, xi, h1r, h1i, o1r, o1i, o2r, o2i, mr, mi = _fused_forward_math(
        x3, fwr, fwi, fhr, fhi, w1rT, w1iT, b1r, b1i, w2rT, w2iT, b2r, b2i, lam,
        BS, BSH, BH, BW, BWF, ACT, PREC)
    if BWD:
        # out = Zr @ GWr - Zi @ GWi  ->  dZr = g @ GWr^T, dZi = -g @ GWi^T
        g2 = tl.reshape(g3, (BS * BH, BW))
        dzr = tl.reshape(tl.dot(g2, tl.trans(gwr), input_precision=PREC), (BS, BH, BWF))
        dzi = -tl.reshape(tl.dot(g2, tl.trans(gwi), input_precision=PREC), (BS, BH, BWF))
        # Zr = Fr Yr + Fi Yi ; Zi = Fr Yi - Fi Yr  (Fr, Fi symmetric)  ->  dYr = Fr dZr - Fi dZi ; dYi = Fi dZr + Fr dZi
        dyr = _bdot(fhr, dzr, BS, PREC) - _bdot(fhi, dzi, BS, PREC)
        dyi = _bdot(fhi, dzr, BS, PREC) + _bdot(fhr, dzi, BS, PREC)
        dyr = tl.reshape(dyr, (BS, BH * BWF))
        dyi = tl.reshape(dyi, (BS, BH * BWF))
        # Y = M * X (complex)
        dmr = dyr * xr + dyi * xi
        dmi = dyi * xr - dyr * xi
        dxr = dyr * mr + dyi * mi
        dxi = dyi * mr - dyr * mi
        # softshrink
        do2r = tl.where((o2r > lam) | (o2r < -lam), dmr, 0.0)
        do2i = tl.where((o2i > lam) | (o2i < -lam), dmi, 0.0)
        # layer 2: O2r = W2r^T O1r - W2i^T O1i + b ; O2i = W2r^T O1i + W2i^T O1r + b
        do1r = tl.dot(tl.trans(w2rT), do2r, input_precision=PREC) + tl.dot(tl.trans(w2iT), do2i, input_precision=PREC)
        do1i = tl.dot(tl.trans(w2rT), do2i, input_precision=PREC) - tl.dot(tl.trans(w2iT), do2r, input_precision=PREC)
        # dW2r[i, o] = sum_n O1r[i,n] dO2r[o,n] + O1i[i,n] dO2i[o,n] ; dW2i[i,o] = sum O1r dO2i - O1i dO2r
        dw2r = tl.dot(o1r, tl.trans(do2r), input_precision=PREC) + tl.dot(o1i, tl.trans(do2i), input_precision=PREC)
        dw2i = tl.dot(o1r, tl.trans(do2i), input_precision=PREC) - tl.dot(o1i, tl.trans(do2r), input_precision=PREC)
        db2r = _rowsum(do2r)
        db2i = _rowsum(do2i)
        dh1r = do1r * _act_grad(h1r, ACT)
        dh1i = do1i * _act_grad(h1i, ACT)
        dw1r = tl.dot(xr, tl.trans(dh1r), input_precision=PREC) + tl.dot(xi, tl.trans(dh1i), input_precision=PREC)
        dw1i = tl.dot(xr, tl.trans(dh1i), input_precision=PREC) - tl.dot(xi, tl.trans(dh1r), input_precision=PREC)
        db1r = _rowsum(dh1r)
        db1i = _rowsum(dh1i)
        dxr += tl.dot(tl.trans(w1rT), dh1r, input_precision=PREC) + tl.dot(tl.trans(w1iT), dh1i, input_precision=PREC)
        dxi += tl.dot(tl.trans(w1rT), dh1i, input_precision=PREC) - tl.dot(tl.trans(w1iT), dh1r, input_precision=PREC)
        # Xr = Fr Tr - Fi Ti ; Xi = Fr Ti + Fi Tr  ->  dTr = Fr dXr + Fi dXi ; dTi = Fr dXi - Fi dXr
        dxr = tl.reshape(dxr, (BS, BH, BWF))
        dxi = tl.reshape(dxi, (BS, BH, BWF))
        dtr = _bdot(fhr, dxr, BS, PREC) + _bdot(fhi, dxi, BS, PREC)
        dti = _bdot(fhr, dxi, BS, PREC) - _bdot(fhi, dxr, BS, PREC)
        # T = A @ FW  ->  dA = dTr @ FWr^T + dTi @ FWi^T
        dtr = tl.reshape(dtr, (BS * BH, BWF))
        dti = tl.reshape(dti, (BS * BH, BWF))
        da = tl.dot(dtr, tl.trans(fwr), input_precision=PREC) + tl.dot(dti, tl.trans(fwi), input_precision=PREC)
        res3 = tl.reshape(da, (BS, BH, BW))
    else:
        yr = tl.reshape(mr * xr - mi * xi, (BS, BH, BWF))
        yi = tl.reshape(mr * xi + mi * xr, (BS, BH, BWF))
        # inverse DFT along H: conj(F_H) (symmetric) -> (fhr, -fhi)
        zr = _bdot(fhr, yr, BS, PREC) + _bdot(fhi, yi, BS, PREC)
        zi = _bdot(fhr, yi, BS, PREC) - _bdot(fhi, yr, BS, PREC)
        # c2r along W
        zr = tl.reshape(zr, (BS * BH, BWF))
        zi = tl.reshape(zi, (BS * BH, BWF))
        out = tl.dot(zr, gwr, input_precision=PREC) - tl.dot(zi, gwi, input_precision=PREC)
        res3 = tl.reshape(out, (BS, BH, BW))
    out_off = ((b * G + g) * bs + c3) * (H * W) + h3 * W + w3
    tl.store(out_ptr + out_off, res3.to(out_ptr.dtype.element_ty), mask=mask3)

    if BWD:
        # partial weight grads of this (b, g): buffers (B, 2, G, ...) in float32
        i_s = tl.arange(0, BS)
        i_h = tl.arange(0, BSH)
        m1 = (i_s[:, None] < bs) & (i_h[None, :] < bsh)
        base_w1 = dw1_ptr + (b * 2 * G + g) * bs * bsh
        off1 = i_s[:, None] * bsh + i_h[None, :]
        tl.store(base_w1 + off1, dw1r, mask=m1)
        tl.store(base_w1 + G * bs * bsh + off1, dw1i, mask=m1)
        m2 = (i_h[:, None] < bsh) & (i_s[None, :] < bs)
        base_w2 = dw2_ptr + (b * 2 * G + g) * bs * bsh
        off2 = i_h[:, None] * bs + i_s[None, :]
        # dw2 computed as (BSH_i, BS_o) from o1 (BSH, N) @ do2^T (N, BS)
        tl.store(base_w2 + off2, dw2r, mask=m2)
        tl.store(base_w2 + G * bs * bsh + off2, dw2i, mask=m2)
        base_b1 = db1_ptr + (b * 2 * G + g) * bsh
        tl.store(base_b1 + i_h, db1r, mask=i_h < bsh)
        tl.store(base_b1 + G * bsh + i_h, db1i, mask=i_h < bsh)
        base_b2 = db2_ptr + (b * 2 * G + g) * bs
        tl.store(base_b2 + i_s, db2r, mask=i_s < bs)
        tl.store(base_b2 + G * bs + i_s, db2i, mask=i_s < bs)


@triton.jit
def _spectral_filter_kernel(
        X_ptr, Y_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
        G, bs, bsh, NF, lam,
        BS: tl.constexpr, BSH: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
):
    """Y = softshrink(MLP(X)) * X on an interleaved complex spectrum (B, C, NF, 2) for one block of BN bins."""
    pid_bg = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    c = tl.arange(0, BS)
    n = pid_n * BN + tl.arange(0, BN)
    mask = (c[:, None] < bs) & (n[None, :] < NF)
    off = (((b * G + g) * bs + c[:, None]) * NF + n[None, :]) * 2
    xr = tl.load(X_ptr + off, mask=mask, other=0.0)
    xi = tl.load(X_ptr + off + 1, mask=mask, other=0.0)
    w1rT, w1iT, w2rT, w2iT, b1r, b1i, b2r, b2i = _load_mlp(w1_ptr, b1_ptr, w2_ptr, b2_ptr, g, G, bs, bsh, BS, BSH)
    h1r, h1i, o1r, o1i, o2r, o2i, mr, mi = _filter_mlp(xr, xi, w1rT, w1iT, b1r, b1i, w2rT, w2iT, b2r, b2i, lam,
                                                       ACT, PREC)
    tl.store(Y_ptr + off, mr * xr - mi * xi, mask=mask)
    tl.store(Y_ptr + off + 1, mr * xi + mi * xr, mask=mask)


def _prep_weights(w1, b1, w2, b2):
    return tuple(t.detach().to(torch.float32).contiguous() for t in (w1, b1, w2, b2))


def _sizes(x, w1, num_groups):
    B, C, H, W = x.shape
    G = num_groups
    bs = C // G
    bsh = w1.shape[-1]
    return B, C, H, W, G, bs, bsh


def _launch_fused(x, grad, out, weights, wgrads, G: int, bs: int, bsh: int, lam: float, act: str, precision: str):
    """Run the fused kernel over the (batch, group) tiles of x into ``out``: the forward when ``wgrads`` is None
    (``grad`` unused), else the backward of upstream ``grad`` with the partial weight-gradient buffers ``wgrads``
    (dw1, db1, dw2, db2)."""
    H, W = x.shape[-2:]
    Wf = W // 2 + 1
    bwd = wgrads is not None
    gy = grad if bwd else x  # the forward reads no gy and writes no weight grads: dummy pointers
    fwr, fwi, fhr, fhi, gwr, gwi = dft_matrices(H, W, x.device)
    BS, BH, BWF = _p2(bs), _p2(H), _p2(Wf)
    _fft_filter_fused_kernel[(x.shape[0] * G,)](
        x, gy, out, fwr, fwi, fhr, fhi, gwr, gwi, *weights, *(wgrads if bwd else (out,) * 4),
        G, bs, bsh, H, W, Wf, *x.stride(), *gy.stride(), float(lam),
        BS=BS, BSH=_p2(bsh), BH=BH, BW=_p2(W), BWF=BWF, ACT=ACT_IDS[act], PREC=precision, BWD=bwd,
        num_warps=4 if BS * BH * BWF <= 4096 else 8,
    )


def fft_filter_fwd(x: torch.Tensor, w1, b1, w2, b2, num_groups: int, sparsity_threshold: float, act: str,
                   precision: str = "ieee") -> torch.Tensor:
    """Forward of the filter (no residual); result in x's dtype (float32 math)."""
    B, C, H, W, G, bs, bsh = _sizes(x, w1, num_groups)
    Wf = W // 2 + 1
    w1, b1, w2, b2 = _prep_weights(w1, b1, w2, b2)
    act_id = ACT_IDS[act]
    if use_fused(C, H, W, G, bsh):
        y = torch.empty((B, C, H, W), device=x.device, dtype=x.dtype)
        _launch_fused(x, None, y, (w1, b1, w2, b2), None, G, bs, bsh, sparsity_threshold, act, precision)
        return y
    # spectral path: cuFFT + fused filter kernel
    X = torch.view_as_real(torch.fft.rfft2(x.float(), dim=(2, 3), norm="ortho")).contiguous()
    Y = torch.empty_like(X)
    NF = H * Wf
    BS, BSH = _p2(bs), _p2(bsh)
    BN = 64 if BS <= 32 else 32
    _spectral_filter_kernel[(B * G, triton.cdiv(NF, BN))](
        X, Y, w1, b1, w2, b2, G, bs, bsh, NF, float(sparsity_threshold),
        BS=BS, BSH=BSH, BN=BN, ACT=act_id, PREC=precision, num_warps=4,
    )
    y = torch.fft.irfft2(torch.view_as_complex(Y), s=(H, W), dim=(2, 3), norm="ortho")
    return y.to(x.dtype)


def fft_filter_bwd(grad: torch.Tensor, x: torch.Tensor, w1, b1, w2, b2, num_groups: int, sparsity_threshold: float,
                   act: str, precision: str = "ieee"):
    """Gradients (dx, dw1, db1, dw2, db2) of the filter output w.r.t. its inputs."""
    B, C, H, W, G, bs, bsh = _sizes(x, w1, num_groups)
    wdt = [t.dtype for t in (w1, b1, w2, b2)]
    w1f, b1f, w2f, b2f = _prep_weights(w1, b1, w2, b2)
    if use_fused(C, H, W, G, bsh):
        gx = torch.empty((B, C, H, W), device=x.device, dtype=x.dtype)
        dw1 = torch.empty((B, 2, G, bs, bsh), device=x.device, dtype=torch.float32)
        dw2 = torch.empty((B, 2, G, bsh, bs), device=x.device, dtype=torch.float32)
        db1 = torch.empty((B, 2, G, bsh), device=x.device, dtype=torch.float32)
        db2 = torch.empty((B, 2, G, bs), device=x.device, dtype=torch.float32)
        _launch_fused(x, grad, gx, (w1f, b1f, w2f, b2f), (dw1, db1, dw2, db2), G, bs, bsh, sparsity_threshold, act,
                      precision)
        grads = (dw1.sum(0), db1.sum(0), dw2.sum(0), db2.sum(0))
        return (gx,) + tuple(gw.to(d) for gw, d in zip(grads, wdt))
    # spectral path: recompute-based analytic backward (torch.fft + transposed einsums, float32)
    grads = fft_filter_reference_backward(grad.float(), x.float(), w1f, b1f, w2f, b2f, G, sparsity_threshold, act)
    return (grads[0].to(x.dtype),) + tuple(gw.to(d) for gw, d in zip(grads[1:], wdt))

"""Plain-PyTorch oracle of the ``fft_filter`` op (AFFNet's adaptive frequency filter, microsoft/TokenMixers).

For x of shape (B, C, H, W) and Wf = W // 2 + 1::

    X  = rfft2(x, norm="ortho")                                  # (B, C, H, Wf) complex
    O1 = act(X @ W1 + b1)        per group, real and imag parts separately activated
    O2 = O1 @ W2 + b2            complex block-diagonal 2-layer MLP over channels (num_groups blocks)
    M  = softshrink(O2, lambda)  on the real and imaginary parts
    y  = irfft2(M * X, s=(H, W), norm="ortho")

Weights follow the official layout: ``w1`` (2, G, bs, bsh), ``b1`` (2, G, bsh), ``w2`` (2, G, bsh, bs), ``b2``
(2, G, bs); index 0 is the real part, 1 the imaginary part; the weight is applied as ``x @ W`` (input index first).
The filter net is written as the same 8 real einsums as the official code, so FlopCounterMode counts the same MACs.

Computation happens in float32 (float64 when x is float64, for oracle checks) with autocast disabled; the result is
returned in x's dtype, without the residual (the AFF mixer adds ``x`` itself).
"""
import torch
import torch.nn.functional as F

from .. import no_autocast

__all__ = ["fft_filter_reference", "compute_dtype", "apply_act", "ACTS"]

ACTS = ("silu", "relu", "gelu", "identity")


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def apply_act(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "relu":
        return F.relu(x)
    if act == "gelu":
        return F.gelu(x)
    if act == "identity":
        return x
    raise ValueError(f"fft_filter: unknown activation {act!r}; choose one of {ACTS}")


def spectral_filter_reference(X: torch.Tensor, w1, b1, w2, b2, num_groups: int, sparsity_threshold: float,
                              act: str) -> torch.Tensor:
    """M * X for a complex spectrum X (B, C, H, Wf): the filter net, softshrink and the complex product."""
    B, C, H, Wf = X.shape
    bs = C // num_groups
    Xg = X.reshape(B, num_groups, bs, H, Wf)
    xr, xi = Xg.real, Xg.imag
    e = "bkihw,kio->bkohw"
    o1r = apply_act(torch.einsum(e, xr, w1[0]) - torch.einsum(e, xi, w1[1]) + b1[0, :, :, None, None], act)
    o1i = apply_act(torch.einsum(e, xi, w1[0]) + torch.einsum(e, xr, w1[1]) + b1[1, :, :, None, None], act)
    o2r = torch.einsum(e, o1r, w2[0]) - torch.einsum(e, o1i, w2[1]) + b2[0, :, :, None, None]
    o2i = torch.einsum(e, o1i, w2[0]) + torch.einsum(e, o1r, w2[1]) + b2[1, :, :, None, None]
    # as the official code: one softshrink over the stacked parts, viewed as complex, one complex product
    M = torch.view_as_complex(F.softshrink(torch.stack([o2r, o2i], dim=-1), sparsity_threshold))
    return M.reshape(B, C, H, Wf) * X


def fft_filter_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                         num_groups: int = 8, sparsity_threshold: float = 0.01, act: str = "silu") -> torch.Tensor:
    """The AFF filter, ``irfft2(softshrink(MLP(X)) * X)`` with ``X = rfft2(x)`` (ortho norm), autograd-capable."""
    dtype = compute_dtype(x, w1, b1, w2, b2)
    with no_autocast(x.device.type):
        H, W = x.shape[-2:]
        xf = x.to(dtype)
        w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))
        X = torch.fft.rfft2(xf, dim=(2, 3), norm="ortho")
        Y = spectral_filter_reference(X, w1, b1, w2, b2, num_groups, sparsity_threshold, act)
        y = torch.fft.irfft2(Y, s=(H, W), dim=(2, 3), norm="ortho")
    return y.to(x.dtype)


def act_grad(h: torch.Tensor, act: str) -> torch.Tensor:
    """d act(h) / dh."""
    if act == "silu":
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    if act == "relu":
        return (h > 0).to(h.dtype)
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(h * 0.7071067811865476))
        return cdf + h * torch.exp(-0.5 * h * h) * 0.3989422804014327
    if act == "identity":
        return torch.ones_like(h)
    raise ValueError(f"fft_filter: unknown activation {act!r}; choose one of {ACTS}")


def _c2r_weights(W: int, Wf: int, dtype, device) -> torch.Tensor:
    coef = torch.full((Wf,), 2.0, dtype=dtype, device=device)
    coef[0] = 1.0
    if W % 2 == 0:
        coef[-1] = 1.0
    return coef


def fft_filter_reference_backward(grad: torch.Tensor, x: torch.Tensor, w1, b1, w2, b2, num_groups: int = 8,
                                  sparsity_threshold: float = 0.01, act: str = "silu"):
    """Analytic gradients (dx, dw1, db1, dw2, db2) of ``fft_filter_reference`` (no autograd needed).

    Every step but the MLP nonlinearities is real-linear, so the adjoints are: irfft2 -> ``c_f * rfft2`` (c2r
    weights c_f = 1 for DC/Nyquist, 2 otherwise), rfft2 -> ``irfft2(. / c_f)``, and transposed einsums for the MLP.
    """
    dtype = compute_dtype(x, w1, b1, w2, b2)
    with no_autocast(x.device.type):
        B, C, H, W = x.shape
        G = num_groups
        bs = C // G
        Wf = W // 2 + 1
        lam = sparsity_threshold
        w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))
        X = torch.fft.rfft2(x.to(dtype), dim=(2, 3), norm="ortho").reshape(B, G, bs, H, Wf)
        xr, xi = X.real, X.imag
        e = "bkihw,kio->bkohw"
        h1r = torch.einsum(e, xr, w1[0]) - torch.einsum(e, xi, w1[1]) + b1[0, :, :, None, None]
        h1i = torch.einsum(e, xi, w1[0]) + torch.einsum(e, xr, w1[1]) + b1[1, :, :, None, None]
        o1r, o1i = apply_act(h1r, act), apply_act(h1i, act)
        o2r = torch.einsum(e, o1r, w2[0]) - torch.einsum(e, o1i, w2[1]) + b2[0, :, :, None, None]
        o2i = torch.einsum(e, o1i, w2[0]) + torch.einsum(e, o1r, w2[1]) + b2[1, :, :, None, None]
        mr, mi = F.softshrink(o2r, lam), F.softshrink(o2i, lam)

        coef = _c2r_weights(W, Wf, dtype, x.device)
        dY = (torch.fft.rfft2(grad.to(dtype), dim=(2, 3), norm="ortho") * coef).reshape(B, G, bs, H, Wf)
        dyr, dyi = dY.real, dY.imag
        dmr = dyr * xr + dyi * xi
        dmi = dyi * xr - dyr * xi
        dxr = dyr * mr + dyi * mi
        dxi = dyi * mr - dyr * mi
        do2r = dmr * (o2r.abs() > lam)
        do2i = dmi * (o2i.abs() > lam)
        et = "bkohw,kio->bkihw"   # x @ W^T
        ew = "bkihw,bkohw->kio"   # weight gradient
        do1r = torch.einsum(et, do2r, w2[0]) + torch.einsum(et, do2i, w2[1])
        do1i = torch.einsum(et, do2i, w2[0]) - torch.einsum(et, do2r, w2[1])
        dw2 = torch.stack([torch.einsum(ew, o1r, do2r) + torch.einsum(ew, o1i, do2i),
                           torch.einsum(ew, o1r, do2i) - torch.einsum(ew, o1i, do2r)])
        db2 = torch.stack([do2r.sum((0, 3, 4)), do2i.sum((0, 3, 4))])
        dh1r = do1r * act_grad(h1r, act)
        dh1i = do1i * act_grad(h1i, act)
        dw1 = torch.stack([torch.einsum(ew, xr, dh1r) + torch.einsum(ew, xi, dh1i),
                           torch.einsum(ew, xr, dh1i) - torch.einsum(ew, xi, dh1r)])
        db1 = torch.stack([dh1r.sum((0, 3, 4)), dh1i.sum((0, 3, 4))])
        dxr = dxr + torch.einsum(et, dh1r, w1[0]) + torch.einsum(et, dh1i, w1[1])
        dxi = dxi + torch.einsum(et, dh1i, w1[0]) - torch.einsum(et, dh1r, w1[1])
        dX = torch.complex(dxr, dxi).reshape(B, C, H, Wf) / coef
        dx = torch.fft.irfft2(dX, s=(H, W), dim=(2, 3), norm="ortho")
    return dx.to(x.dtype), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)

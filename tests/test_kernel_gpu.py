"""GPU parity of the *compiled* Triton kernels (``pytest -m gpu``; ``tools/gpu_check.sh`` runs this file on its own).

Every op, forward and every input gradient, float32 and bfloat16 inputs, odd sizes and the real model shapes, against
the PyTorch reference run in float64 on float64 copies of the same inputs. Relative norm error
``||out - ref|| / ||ref||``: float32 < 1e-4, bfloat16 < 3e-2.

This file must run in a process of its own without ``TRITON_INTERPRET`` (the CPU kernel tests set it at import, and
Triton fixes its mode when it is first imported); it skips when that variable is set or no CUDA device is present.
On a CPU machine every test skips.
"""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                       reason="TRITON_INTERPRET=1: run this file alone (tools/gpu_check.sh), not with the CPU kernel tests"),
]

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16]


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def parity(kernel_fn, ref_fn, inputs, low_precision, dtype):
    """Compare kernel_fn(*inputs) with ref_fn on float64 copies (of the low-precision-rounded values): forward and the
    gradient of every floating input. ``low_precision``: indices of the inputs cast to ``dtype``."""
    ins = [t.to(dtype) if i in low_precision else t for i, t in enumerate(inputs)]
    ins = [t.detach().requires_grad_(t.is_floating_point()) for t in ins]
    ins64 = [t.detach().double().requires_grad_(t.is_floating_point()) for t in ins]
    out = kernel_fn(*ins)
    ref = ref_fn(*ins64)
    errs = {"out": rel(out, ref)}
    g = torch.randn(ref.shape, device=ref.device, dtype=torch.float64)
    leaves = [i for i, t in enumerate(ins) if t.requires_grad]
    ga = torch.autograd.grad(out, [ins[i] for i in leaves], g.to(out.dtype))
    gb = torch.autograd.grad(ref, [ins64[i] for i in leaves], g)
    for i, a, b in zip(leaves, ga, gb):
        assert a.dtype == ins[i].dtype and a.shape == ins[i].shape
        errs[f"grad{i}"] = rel(a, b)
    torch.cuda.synchronize()
    bad = {k: v for k, v in errs.items() if v > TOL[dtype]}
    assert not bad, f"{dtype}: {bad} (all: {errs})"


# ----------------------------------------------------------------------------------------------------------------------
# selective_scan2d / selective_scan
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 40, 7, 9, 16), (2, 192, 14, 14, 16), (1, 24, 56, 56, 16), (3, 5, 1, 13, 3)])
def test_selective_scan2d_gpu(shape, dtype):
    from metaformer_zoo.kernels.selective_scan2d import reference, selective_scan2d
    torch.manual_seed(0)
    Bsz, Ch, H, W, N = shape
    L = H * W
    dev = "cuda"
    x = torch.randn(Bsz, Ch, H, W, device=dev).contiguous(memory_format=torch.channels_last)
    ins = [x, torch.randn(Bsz, 4, Ch, L, device=dev) * 0.5 - 1, -torch.rand(4 * Ch, N, device=dev) * 4 - 0.1,
           torch.randn(Bsz, 4, N, L, device=dev), torch.randn(Bsz, 4, N, L, device=dev),
           torch.randn(4 * Ch, device=dev), torch.randn(4 * Ch, device=dev) * 0.3]
    parity(lambda *a: selective_scan2d(*a, delta_softplus=True, backend="triton"),
           lambda *a: reference.selective_scan2d(*a, delta_softplus=True), ins, {0, 1, 3, 4}, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 32, 12, 16, 2, 2), (301, 12, 37, 4, 0, 3)])
def test_selective_scan_1d_gpu(shape, dtype):
    from metaformer_zoo.kernels.selective_scan2d import reference, selective_scan
    torch.manual_seed(1)
    M, dim, L, N, GB, GC = shape
    dev = "cuda"

    def bc(G):
        return torch.randn(M, N, L, device=dev) if G == 0 else torch.randn(M, G, N, L, device=dev)
    ins = [torch.randn(M, dim, L, device=dev), torch.randn(M, dim, L, device=dev) * 0.5,
           -torch.arange(1, N + 1, device=dev, dtype=torch.float32).repeat(dim, 1), bc(GB), bc(GC),
           torch.randn(dim, device=dev), torch.randn(M, dim, L, device=dev), torch.randn(dim, device=dev) * 0.3]
    parity(lambda *a: selective_scan(*a, delta_softplus=True, backend="triton"),
           lambda *a: reference.selective_scan(*a, delta_softplus=True), ins, {0, 1, 3, 4, 6}, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# fft_filter (AFFNet)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64, 14, 14, 8), (2, 48, 13, 15, 8), (4, 128, 32, 32, 8), (1, 16, 7, 1, 8)])
def test_fft_filter_gpu(shape, dtype):
    from metaformer_zoo.kernels.fft_filter import fft_filter, fft_filter_reference
    torch.manual_seed(2)
    Bsz, C, H, W, G = shape
    bs, dev = C // G, "cuda"
    hid = bs
    ins = [torch.randn(Bsz, C, H, W, device=dev), torch.randn(2, G, bs, hid, device=dev) * 0.3,
           torch.randn(2, G, hid, device=dev) * 0.1, torch.randn(2, G, hid, bs, device=dev) * 0.3,
           torch.randn(2, G, bs, device=dev) * 0.1]
    parity(lambda *a: fft_filter(*a, num_groups=G, backend="triton"),
           lambda *a: fft_filter_reference(*a, G, 0.01, "silu"), ins, {0}, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# strip_mix (RaftMLP / Strip-MLP)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    ("h", 2, 4, 1, 1, (8, 96, 56, 56)),   # RaftMLP-S fc1 at stage 1
    ("w", 4, 2, 1, 1, (8, 96, 56, 56)),   # RaftMLP-S fc2
    ("w", 1, 1, 3, 3, (4, 96, 28, 28)),   # Strip-MLP proj_h
    ("h", 2, 2, 2, 3, (3, 12, 9, 17)),    # odd sizes across the tiles
])
def test_strip_mix_gpu(case, dtype):
    from metaformer_zoo.kernels.strip_mix import strip_mix, strip_mix_reference
    torch.manual_seed(3)
    axis, r, ro, G, K, (Bsz, C, H, W) = case
    L = H if axis == "h" else W
    dev = "cuda"
    ins = [torch.randn(Bsz, C, H, W, device=dev), torch.randn(G, ro * L, r * L, K, device=dev) / (r * L * K) ** 0.5,
           torch.randn(G, ro * L, device=dev)]
    parity(lambda *a: strip_mix(*a, axis, r, backend="triton"),
           lambda *a: strip_mix_reference(*a, axis, r), ins, {0, 1, 2}, dtype)

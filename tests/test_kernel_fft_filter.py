"""fft_filter op: Triton kernels (CPU interpreter) and the analytic reference backward against the PyTorch oracle.

Tolerances: the reference in float32 agrees with float64 to ~1e-6; the Triton kernels (float32 DFT-as-matmul) agree
with the float64 reference to atol 2e-5 / rtol 1e-4 on O(1) inputs (observed ~2e-6 abs on the forward, ~3e-7
relative on gradients).
"""
import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import metaformer_zoo  # noqa: E402,F401
from metaformer_zoo.kernels import resolve_backend  # noqa: E402
from metaformer_zoo.kernels.fft_filter import fft_filter, fft_filter_reference  # noqa: E402
from metaformer_zoo.kernels.fft_filter.reference import fft_filter_reference_backward  # noqa: E402

# decorate the kernels in interpreter mode now (re-decorate if an earlier module imported them compiled-mode)
_TK = "metaformer_zoo.kernels.fft_filter.triton"
if _TK in sys.modules:
    importlib.reload(sys.modules[_TK])
else:
    importlib.import_module(_TK)

ATOL, RTOL = 2e-5, 1e-4
SHAPES = [(1, 16, 7, 7), (2, 16, 8, 8), (1, 16, 5, 9), (2, 16, 1, 6), (1, 16, 6, 1)]


def _inputs(B, C, H, W, G=8, hidden=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    bs = C // G
    hid = hidden or bs
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    w1 = 0.5 * torch.randn(2, G, bs, hid, generator=g, dtype=dtype)
    b1 = 0.1 * torch.randn(2, G, hid, generator=g, dtype=dtype)
    w2 = 0.5 * torch.randn(2, G, hid, bs, generator=g, dtype=dtype)
    b2 = 0.1 * torch.randn(2, G, bs, generator=g, dtype=dtype)
    return x, [w1, b1, w2, b2]


def _ref_with_grads(x, ws, gy, act="silu", G=8):
    a = [t.detach().double().requires_grad_(True) for t in [x] + ws]
    y = fft_filter_reference(*a, G, 0.01, act)
    return y, torch.autograd.grad(y, a, gy.double())


def _run(x, ws, gy, backend, act="silu", G=8):
    a = [t.detach().clone().requires_grad_(True) for t in [x] + ws]
    y = fft_filter(*a, num_groups=G, act=act, backend=backend)
    return y, torch.autograd.grad(y, a, gy.to(y.dtype))


def _close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def test_reference_float32_matches_float64():
    x, ws = _inputs(2, 16, 7, 9)
    y64 = fft_filter_reference(x, *ws, 8, 0.01, "silu")
    y32 = fft_filter_reference(x.float(), *[w.float() for w in ws], 8, 0.01, "silu")
    assert y32.dtype == torch.float32
    _close(y32, y64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["silu", "relu", "gelu"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 7), (1, 16, 5, 9), (1, 16, 6, 1)])
def test_reference_backward_is_the_adjoint(shape, act):
    """The analytic backward (used inside the custom op) equals autograd through the oracle, in float64."""
    x, ws = _inputs(*shape)
    gy = torch.randn(shape, dtype=torch.float64)
    _, want = _ref_with_grads(x, ws, gy, act)
    got = fft_filter_reference_backward(gy, x, *ws, 8, 0.01, act)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


def test_reference_backend_gradcheck():
    x, ws = _inputs(1, 8, 3, 4)
    a = [t.requires_grad_(True) for t in [x] + ws]
    assert torch.autograd.gradcheck(lambda *t: fft_filter(*t, num_groups=8, backend="reference"), a, fast_mode=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_fused_forward_and_grads(shape):
    x, ws = _inputs(*shape)
    gy = torch.randn(shape, dtype=torch.float64)
    y_ref, g_ref = _ref_with_grads(x, ws, gy)
    y, grads = _run(x.float(), [w.float() for w in ws], gy.float(), "triton")
    assert y.dtype == torch.float32 and y.shape == shape
    _close(y, y_ref)
    for g, r in zip(grads, g_ref):
        _close(g, r)


def test_triton_fused_hidden_factor_and_relu():
    x, ws = _inputs(1, 16, 6, 5, hidden=4)
    gy = torch.randn(x.shape, dtype=torch.float64)
    y_ref, g_ref = _ref_with_grads(x, ws, gy, act="relu")
    y, grads = _run(x.float(), [w.float() for w in ws], gy.float(), "triton", act="relu")
    _close(y, y_ref)
    for g, r in zip(grads, g_ref):
        _close(g, r)


def test_triton_fused_odd_block_size():
    """AFFNet-ET stage-4 width (C=104 -> block size 13, padded to 16 in the kernel) on a 5x6 map."""
    x, ws = _inputs(1, 104, 5, 6)
    ws = [0.4 * w for w in ws]
    gy = torch.randn(x.shape, dtype=torch.float64)
    y_ref, g_ref = _ref_with_grads(x, ws, gy)
    y, grads = _run(x.float(), [w.float() for w in ws], gy.float(), "triton")
    _close(y, y_ref)
    for g, r in zip(grads, g_ref):
        _close(g, r, atol=1e-4)


def test_triton_spectral_path(monkeypatch):
    """Large-map path (torch.fft + Triton filter kernel), forced by shrinking the fused tile limit."""
    from metaformer_zoo.kernels.fft_filter import triton as tk
    monkeypatch.setattr(tk, "FUSED_MAX_TILE", 0)
    assert not tk.use_fused(16, 7, 9, 8, 2)
    x, ws = _inputs(2, 16, 7, 9)
    gy = torch.randn(x.shape, dtype=torch.float64)
    y_ref, g_ref = _ref_with_grads(x, ws, gy)
    y, grads = _run(x.float(), [w.float() for w in ws], gy.float(), "triton")
    _close(y, y_ref)
    for g, r in zip(grads, g_ref):
        _close(g, r)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_triton_noncontiguous_inputs(layout):
    x, ws = _inputs(1, 16, 7, 10)
    if layout == "channels_last":
        xin = x.float().contiguous(memory_format=torch.channels_last)
    else:
        xin = x.float().transpose(2, 3).contiguous().transpose(2, 3)  # same values, W-major strides
        x = x.clone()
    assert not xin.is_contiguous()
    gy = torch.randn(x.shape, dtype=torch.float64)
    gy_in = gy.float().transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous incoming grad
    y_ref, g_ref = _ref_with_grads(x, ws, gy)
    a = [xin.detach().requires_grad_(True)] + [w.float().requires_grad_(True) for w in ws]
    y = fft_filter(*a, num_groups=8, backend="triton")
    grads = torch.autograd.grad(y, a, gy_in)
    _close(y, y_ref)
    for g, r in zip(grads, g_ref):
        _close(g, r)


def test_triton_bfloat16_input_computes_in_float32():
    x, ws = _inputs(1, 16, 8, 8)
    xb = x.to(torch.bfloat16)
    y = fft_filter(xb, *[w.float() for w in ws], num_groups=8, backend="triton")
    assert y.dtype == torch.bfloat16
    want = fft_filter_reference(xb.double(), *ws, 8, 0.01, "silu")
    _close(y, want, atol=3e-2, rtol=2e-2)  # only the final bf16 rounding differs


def test_dispatch(monkeypatch):
    x, ws = _inputs(1, 16, 4, 4, dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    assert resolve_backend("auto", x, *ws) == "reference"  # CPU tensors, interpreter off
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "triton")
    assert resolve_backend("auto", x) == "triton"
    assert resolve_backend("reference", x) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "auto")
    assert resolve_backend("auto", x) == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        fft_filter(x, *ws, num_groups=8, backend="cuda")


def test_argument_errors():
    x, ws = _inputs(1, 16, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        fft_filter(x[:, :12], *ws, num_groups=8)
    with pytest.raises(ValueError, match="w1 has shape"):
        fft_filter(x, ws[0][:, :, :1], *ws[1:], num_groups=8)
    with pytest.raises(ValueError, match="unknown activation"):
        fft_filter(x, *ws, num_groups=8, act="tanhh")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fft_filter(x[0], *ws, num_groups=8)


def test_custom_op_opcheck_and_compile():
    """Registered op: fake/autograd registrations pass opcheck; torch.compile captures it in one graph."""
    x, ws = _inputs(1, 16, 5, 6, dtype=torch.float32)
    args = [x.requires_grad_(True)] + [w.requires_grad_(True) for w in ws] + [8, 0.01, "silu", "reference"]
    torch.library.opcheck(torch.ops.metaformer_zoo.fft_filter.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def f(x, w1, b1, w2, b2):
        return fft_filter(x, w1, b1, w2, b2, num_groups=8, backend="reference").sin()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = cf(*[t.detach().requires_grad_(True) for t in [x] + ws])
    torch.testing.assert_close(y, f(*[t.detach() for t in [x] + ws]))
    y.sum().backward()


def test_autocast_runs_filter_in_float32():
    from metaformer_zoo.mixers.affnet import AFFMixer
    torch.manual_seed(0)
    m = AFFMixer(16, backend="reference")
    x = torch.randn(2, 16, 6, 7)
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_benchmark_cases_build_and_run_on_cpu():
    """The GPU benchmark cases are well-formed (smoke shapes on CPU, every case run through both backends)."""
    from metaformer_zoo.kernels.fft_filter.bench import benchmark_cases
    full = benchmark_cases(batch=1, device="cpu", dtype=torch.float32)
    assert len(full) >= 9 and all(c["bytes"] > 0 and c["bytes_fwd_bwd"] > c["bytes"] for c in full)
    for c in benchmark_cases(device="cpu", dtype=torch.float32, smoke=True):
        y_ref, y_tri = c["reference"](), c["triton"]()
        assert y_ref.requires_grad and y_tri.requires_grad
        _close(y_tri, y_ref, atol=1e-4)

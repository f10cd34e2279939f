"""strip_mix kernel: Triton (CPU interpreter) vs the PyTorch reference, checked in float64; dispatch; custom op.

Tolerance: the Triton kernels run in fp32 (fp32 accumulation, IEEE dot) on tiny problems; forward and every gradient
must match the float64 reference to rtol = atol = 1e-5. The reference itself is checked against a brute-force loop
and with float64 gradcheck.
"""
import importlib
import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import metaformer_zoo  # noqa: E402,F401
from metaformer_zoo.kernels import resolve_backend  # noqa: E402
from metaformer_zoo.kernels.strip_mix import strip_mix, strip_mix_reference  # noqa: E402

# decorate the Triton kernels now, as interpreted functions (triton.jit reads the flag at decoration time) ...
importlib.import_module("metaformer_zoo.kernels.strip_mix.triton")
# ... then restore the flag, so it does not leak into other test modules of the same session (with it set,
# backend="auto" would route every CPU call of every model test through the slow interpreter)
if _PREV_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

TOL = dict(rtol=1e-5, atol=1e-5)

# (axis, raft_size, r_out, groups, K, (B, C, H, W))
CASES = [
    ("h", 2, 4, 1, 1, (2, 8, 5, 7)),      # RaftMLP fc1-like: raft 2 -> 4
    ("w", 4, 2, 1, 1, (1, 8, 3, 6)),      # RaftMLP fc2-like: raft 4 -> 2
    ("w", 1, 1, 3, 3, (2, 12, 6, 5)),     # Strip-MLP proj_h-like: 3 groups, window 3
    ("h", 1, 1, 2, 3, (1, 8, 7, 4)),      # Strip-MLP proj_w-like
    ("h", 2, 2, 2, 3, (1, 8, 9, 17)),     # P = 17 and F_out = 18 cross the 16-wide tiles
    ("h", 1, 1, 1, 3, (1, 4, 1, 9)),      # 1 x N, mixing along the length-1 axis
    ("w", 1, 1, 1, 3, (1, 4, 9, 1)),      # N x 1
    ("h", 1, 1, 1, 3, (1, 4, 9, 1)),      # N x 1, window across a length-1 axis
]


def _make(axis, r, ro, G, K, shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    L = H if axis == "h" else W
    x = torch.randn(shape, generator=g, dtype=dtype)
    w = torch.randn(G, ro * L, r * L, K, generator=g, dtype=dtype) / (r * L * K) ** 0.5
    b = torch.randn(G, ro * L, generator=g, dtype=dtype)
    return x, w, b


def _brute(x, w, b, axis, r):
    """Independent loop formula: out[b, jo*M+co, lo, p] = bias + sum W[g, jo*L+lo, j*L+l, k] x[b, j*M+co, l, p+k-K//2]."""
    xa = x if axis == "h" else x.transpose(2, 3)
    B, C, L, P = xa.shape
    G, Fo, _, K = w.shape
    M, ro = C // r, Fo // L
    out = torch.zeros(B, ro * M, L, P, dtype=x.dtype)
    xp = torch.nn.functional.pad(xa, (K // 2, K // 2))
    for co in range(M):
        g = co % G
        for jo in range(ro):
            for lo in range(L):
                acc = b[g, jo * L + lo].expand(B, P).clone()
                for j in range(r):
                    for l in range(L):
                        for k in range(K):
                            acc += w[g, jo * L + lo, j * L + l, k] * xp[:, j * M + co, l, k:k + P]
                out[:, jo * M + co, lo] = acc
    return out if axis == "h" else out.transpose(2, 3)


@pytest.mark.parametrize("case", CASES[:4])
def test_reference_matches_brute_force_and_gradcheck(case):
    axis, r, ro, G, K, shape = case
    x, w, b = _make(*case)
    torch.testing.assert_close(strip_mix_reference(x, w, b, axis, r), _brute(x, w, b, axis, r), rtol=1e-10, atol=1e-10)
    # float64 gradcheck of the registered autograd formula (fast mode, a smaller map of the same structure)
    B, C, H, W = shape
    xs = [t.clone().requires_grad_() for t in _make(axis, r, ro, G, K, (1, C, min(H, 4), min(W, 4)))]
    assert torch.autograd.gradcheck(lambda a, c, d: strip_mix(a, c, d, axis, r, backend="reference"), xs,
                                    fast_mode=True)


def _check_triton(x, w, b, axis, r, x64=None):
    """Triton (fp32) forward and all gradients vs the float64 reference."""
    x64 = x.double() if x64 is None else x64
    ref_in = [t.double().detach().clone().requires_grad_() for t in (x64, w, b)]
    y = strip_mix_reference(ref_in[0], ref_in[1], ref_in[2], axis, r)
    gy = torch.randn_like(y)
    y.backward(gy)
    xt = x.detach() if x.dtype == torch.float32 else x.detach().float()  # detach keeps the caller's strides
    assert xt.stride() == x.stride() or x.dtype != torch.float32
    tri_in = [xt.requires_grad_(), w.float().detach().clone().requires_grad_(),
              b.float().detach().clone().requires_grad_()]
    yt = strip_mix(tri_in[0], tri_in[1], tri_in[2], axis, r, backend="triton")
    yt.backward(gy.float())
    torch.testing.assert_close(yt.double(), y.detach(), **TOL)
    for a, c in zip(tri_in, ref_in):
        torch.testing.assert_close(a.grad.double(), c.grad, **TOL)


@pytest.mark.parametrize("case", CASES)
def test_triton_forward_backward(case):
    axis, r, ro, G, K, shape = case
    x, w, b = _make(*case)
    _check_triton(x, w, b, axis, r)


def test_triton_channels_last_and_noncontiguous():
    x, w, b = _make("w", 1, 1, 2, 3, (2, 8, 5, 6))
    xcl = x.float().contiguous(memory_format=torch.channels_last)
    assert not xcl.is_contiguous()
    _check_triton(xcl, w, b, "w", 1, x64=x)
    # a strided channel slice and a transposed view, read in place through their strides
    big = torch.randn(2, 16, 6, 5, dtype=torch.float32)
    xs = big[:, ::2].transpose(2, 3)  # (2, 8, 5, 6), non-contiguous
    assert not xs.is_contiguous()
    _check_triton(xs, w, b, "w", 1, x64=xs.double())
    x2, w2, b2 = _make("h", 2, 4, 1, 1, (1, 8, 5, 7))
    _check_triton(x2.float().contiguous(memory_format=torch.channels_last), w2, b2, "h", 2, x64=x2)


def test_reference_backend_channels_last_matches():
    x, w, b = _make("h", 1, 1, 2, 3, (1, 8, 5, 6), dtype=torch.float32)
    y0 = strip_mix(x, w, b, "h", 1, backend="reference")
    y1 = strip_mix(x.contiguous(memory_format=torch.channels_last), w, b, "h", 1, backend="reference")
    torch.testing.assert_close(y0, y1)


def test_dispatch(monkeypatch):
    x = torch.zeros(1, 2, 3, 3)
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", x) == "reference"  # CPU tensors, interpreter off
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", x) == "triton"
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "reference")
    assert resolve_backend("auto", x) == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("cuda-magic", x)


def test_single_custom_op_in_traced_graph():
    from torch.fx.experimental.proxy_tensor import make_fx
    x, w, b = _make("h", 2, 4, 1, 1, (1, 8, 5, 7), dtype=torch.float32)
    gm = make_fx(lambda a, c, d: strip_mix(a, c, d, "h", 2, backend="reference"))(x, w, b)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == ["metaformer_zoo.strip_mix.default"], targets


def test_opcheck_reference():
    x, w, b = _make("w", 1, 1, 3, 3, (1, 6, 4, 5), dtype=torch.float32)
    torch.library.opcheck(torch.ops.metaformer_zoo.strip_mix.default, (x.requires_grad_(), w, b, "w", 1, "reference"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_autocast_and_errors():
    x, w, b = _make("h", 2, 4, 1, 1, (1, 8, 5, 7), dtype=torch.float32)
    w = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = strip_mix(x, w, b, "h", 2, backend="reference")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), strip_mix_reference(x, w, b, "h", 2), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="tied to the feature-map size"):
        strip_mix(torch.zeros(1, 8, 6, 7), w.detach(), b, "h", 2)
    with pytest.raises(ValueError, match="axis"):
        strip_mix(x, w.detach(), b, "z", 2)
    with pytest.raises(ValueError, match="raft_size"):
        strip_mix(torch.zeros(1, 7, 5, 7), w.detach(), b, "h", 2)


def test_triton_bf16_forward_backward():
    """bf16 inputs (fp32 accumulation): within bf16 resolution of the float64 reference."""
    x, w, b = _make("w", 1, 1, 2, 3, (1, 8, 5, 6))
    ins = [t.to(torch.bfloat16).requires_grad_() for t in (x, w, b)]
    y = strip_mix(*ins, "w", 1, backend="triton")
    assert y.dtype == torch.bfloat16
    ref_in = [t.to(torch.bfloat16).double().requires_grad_() for t in (x, w, b)]
    yr = strip_mix_reference(*ref_in, "w", 1)
    torch.testing.assert_close(y.double(), yr.detach(), rtol=2e-2, atol=3e-2)
    gy = torch.randn_like(yr)
    y.backward(gy.to(torch.bfloat16))
    yr.backward(gy)
    for a, c in zip(ins, ref_in):
        torch.testing.assert_close(a.grad.double(), c.grad, rtol=2e-2, atol=6e-2)


def test_torch_compile_fullgraph_one_op():
    """Dynamo traces the wrapper without graph breaks (fake impl + registered autograd); aot_eager, no C++ compile."""
    x, w, b = _make("h", 2, 4, 1, 1, (1, 8, 5, 7), dtype=torch.float32)
    ins = [t.clone().requires_grad_() for t in (x, w, b)]
    f = torch.compile(lambda a, c, d: strip_mix(a, c, d, "h", 2, backend="reference"), backend="aot_eager",
                      fullgraph=True)
    y = f(*ins)
    torch.testing.assert_close(y, strip_mix_reference(x, w, b, "h", 2))
    y.sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    strip_mix_reference(*ref, "h", 2).sum().backward()
    for a, c in zip(ins, ref):
        torch.testing.assert_close(a.grad, c.grad)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [
    ("raftmlp_s", dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), img_size=32)),
    ("stripmlp_light_t", dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), img_size=32)),
])
def test_models_through_triton_interpreter(name, kw, monkeypatch):
    """The model seam end to end: logits and parameter gradients with the Triton kernels equal the reference path."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    grads = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("METAFORMER_ZOO_KERNELS", backend)
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        grads[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=1e-4, atol=1e-5)
    for n, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["triton"][1][n], g, rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")

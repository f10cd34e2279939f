"""selective_scan2d / selective_scan: Triton kernels (CPU interpreter) vs the float64 oracle, dispatch, custom-op
registration.

``TRITON_INTERPRET=1`` must be set before triton or the kernel module is imported, so it is set first thing here and
the kernel package is imported after it.

Tolerances: the kernels accumulate in float32; every forward output and every gradient is compared with the float64
oracle (``selective_scan_ref_naive`` + cross_scan / cross_merge, run on float64 copies of the inputs) by the relative
norm error ||out - ref|| / ||ref|| <= 2e-5 (measured ~1e-7 at these shapes); bf16 inputs <= 2e-2. The plain-PyTorch
reference itself is checked against the oracle in float64 at 1e-10.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from metaformer_zoo.kernels import resolve_backend  # noqa: E402
from metaformer_zoo.kernels import selective_scan2d as ss  # noqa: E402
from metaformer_zoo.kernels.selective_scan2d import reference  # noqa: E402

pytest.importorskip("triton")

TOL = 2e-5


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the tested output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def oracle2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """float64 oracle of the fused op: cross_scan -> naive recurrence -> cross_merge."""
    Bsz, Ch, H, W = x.shape
    L = H * W
    xs = reference.cross_scan(x).reshape(Bsz, 4 * Ch, L)
    ys = reference.selective_scan_ref_naive(xs, delta.reshape(Bsz, 4 * Ch, L), A, B, C, D, None, delta_bias,
                                            delta_softplus)
    return reference.cross_merge(ys.view(Bsz, 4, Ch, L), H, W)


def make2d(Bsz, Ch, H, W, N, D=True, bias=True, gen=None, dtype=torch.float32):
    L = H * W
    g = gen
    t = dict(
        x=torch.randn(Bsz, Ch, H, W, generator=g),
        delta=torch.randn(Bsz, 4, Ch, L, generator=g) * 0.5,
        A=-(torch.rand(4 * Ch, N, generator=g) + 0.1) * 2,
        B=torch.randn(Bsz, 4, N, L, generator=g),
        C=torch.randn(Bsz, 4, N, L, generator=g),
        D=torch.randn(4 * Ch, generator=g) if D else None,
        delta_bias=torch.randn(4 * Ch, generator=g) * 0.3 if bias else None,
    )
    return {k: (v.to(dtype) if v is not None and k not in ("A", "D", "delta_bias") else v) for k, v in t.items()}


def check_fwd_bwd(fn, oracle, args: dict, tol=TOL, **kw):
    """Run fn (Triton) and the float64 oracle; compare the output and the gradient of every tensor input."""
    names = [k for k, v in args.items() if v is not None]
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in names else None) for k, v in args.items()}
    leaves64 = {k: (v.detach().double().requires_grad_(True) if k in names else None) for k, v in args.items()}
    out = fn(**leaves, **kw)
    ref = oracle(**leaves64, **kw)
    assert out.shape == ref.shape and out.dtype == args[next(iter(args))].dtype
    assert rel(out, ref) < tol, f"forward rel err {rel(out, ref):.2e}"
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], g.to(out.dtype))
    grads64 = torch.autograd.grad(ref, [leaves64[k] for k in names], g)
    for k, a, b in zip(names, grads, grads64):
        assert a.shape == args[k].shape and a.dtype == args[k].dtype, k
        assert rel(a, b) < tol, f"grad {k}: rel err {rel(a, b):.2e}"
    return out, grads


def tri2d(**kw):
    return ss.selective_scan2d(**kw, backend="triton")


# ----------------------------------------------------------------------------------------------------------------------
# the reference (float64) vs the independent oracle, and cross_scan / cross_merge
# ----------------------------------------------------------------------------------------------------------------------
def test_reference_float64_matches_oracle():
    torch.manual_seed(0)
    a = {k: (v.double() if v is not None else None) for k, v in make2d(1, 3, 5, 6, 4).items()}
    out = reference.selective_scan2d(**a, chunk_size=7)
    assert out.dtype == torch.float64
    assert rel(out, oracle2d(**a)) < 1e-10


def test_cross_scan_routes_and_adjoint():
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).view(1, 2, 3, 4)
    xs = ss.cross_scan(x)
    H, W = 3, 4
    for t in range(H * W):
        assert xs[0, 0, :, t].tolist() == x[0, :, t // W, t % W].tolist()
        assert xs[0, 1, :, t].tolist() == x[0, :, t % H, t // H].tolist()
        assert xs[0, 2, :, t].tolist() == xs[0, 0, :, H * W - 1 - t].tolist()
        assert xs[0, 3, :, t].tolist() == xs[0, 1, :, H * W - 1 - t].tolist()
    y = torch.randn(1, 4, 2, H * W, dtype=torch.float64)
    lhs = (xs * y).sum()
    rhs = (x * ss.cross_merge(y, H, W)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# fused 2D op: forward + every gradient
# ----------------------------------------------------------------------------------------------------------------------
CASES_2D = [
    # (Bsz, C, H, W, N, D, bias, softplus)
    (2, 3, 4, 5, 4, True, True, True),     # L = 20: 2 chunks, the second one partial
    (1, 2, 1, 7, 3, False, False, True),   # 1 x N map, N not a power of two
    (1, 2, 6, 1, 4, True, False, False),   # N x 1 map, softplus off
    (1, 10, 3, 3, 2, False, True, True),   # C = 10: two channel blocks (8 + 2 masked)
    (1, 2, 5, 7, 5, True, True, False),    # L = 35 (3 chunks), odd everything
]


@pytest.mark.parametrize("Bsz,Ch,H,W,N,D,bias,softplus", CASES_2D)
def test_selective_scan2d_triton_fwd_bwd(Bsz, Ch, H, W, N, D, bias, softplus):
    gen = torch.Generator().manual_seed(Bsz * 1000 + Ch * 100 + H * 10 + W)
    args = make2d(Bsz, Ch, H, W, N, D, bias, gen)
    check_fwd_bwd(tri2d, oracle2d, args, delta_softplus=softplus)


def test_selective_scan2d_channels_last_and_strided_inputs():
    gen = torch.Generator().manual_seed(7)
    Bsz, Ch, H, W, N = 2, 3, 3, 4, 4
    L = H * W
    a = make2d(Bsz, Ch, H, W, N, gen=gen)
    a["x"] = a["x"].contiguous(memory_format=torch.channels_last)
    # delta laid out (B, L, 4, C), B / C as (B, L, 4, N), A transposed storage: all non-contiguous views
    a["delta"] = a["delta"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    a["B"] = a["B"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    a["C"] = torch.randn(Bsz, 4, N, 2 * L, generator=gen)[..., ::2]
    a["A"] = a["A"].t().contiguous().t()
    assert not a["delta"].is_contiguous() and not a["C"].is_contiguous() and not a["A"].is_contiguous()
    out, _ = check_fwd_bwd(tri2d, oracle2d, a)
    assert out.is_contiguous(memory_format=torch.channels_last)  # output keeps x's memory format


def test_selective_scan2d_noncontiguous_grad_output():
    gen = torch.Generator().manual_seed(3)
    a = make2d(1, 2, 3, 5, 4, gen=gen)
    x = a["x"].requires_grad_(True)
    out = tri2d(**a)
    ref = oracle2d(**{k: (v.double() if v is not None else None) for k, v in a.items()})
    g = torch.randn(1, 5, 3, 2, generator=gen).permute(0, 3, 2, 1)  # strided upstream gradient
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = a["x"].detach().double().requires_grad_(True)
    (gx64,) = torch.autograd.grad(oracle2d(**{**{k: (v.double() if v is not None else None) for k, v in a.items()},
                                              "x": x64}), x64, g.double())
    assert rel(out, ref) < TOL and rel(gx, gx64) < TOL


def test_selective_scan2d_bf16_and_autocast():
    gen = torch.Generator().manual_seed(11)
    a = make2d(1, 2, 3, 4, 4, gen=gen)
    a16 = {k: (v.to(torch.bfloat16) if k in ("x", "delta", "B", "C") else v) for k, v in a.items()}
    ref = oracle2d(**{k: (v.double() if v is not None else None) for k, v in a16.items()})
    out = tri2d(**a16)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 2e-2
    x = a16["x"].requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2 = tri2d(**a16)
    assert out2.dtype == torch.bfloat16 and rel(out2, ref) < 2e-2
    g = torch.randn(out2.shape, generator=gen)
    (gx,) = torch.autograd.grad(out2, x, g.to(torch.bfloat16))
    x64 = a16["x"].detach().double().requires_grad_(True)
    ref64 = oracle2d(**{**{k: (v.detach().double() if v is not None else None) for k, v in a16.items()}, "x": x64})
    (gx64,) = torch.autograd.grad(ref64, x64, g.to(torch.bfloat16).double())
    assert gx.dtype == torch.bfloat16 and rel(gx, gx64) < 2e-2


def test_selective_scan2d_backward_deterministic_and_fully_written(monkeypatch):
    """Two backward runs are bitwise equal; every buffer the kernels fill is poisoned with NaN first."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*s, **k):
        return real_empty(*s, **k).fill_(float("nan"))

    def nan_empty_like(*s, **k):
        return real_empty_like(*s, **k).fill_(float("nan"))

    gen = torch.Generator().manual_seed(5)
    a = make2d(2, 10, 2, 3, 2, gen=gen)  # 2 channel blocks, 2 splits -> partial dB / dC accumulation
    runs = []
    for _ in range(2):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in a.items()}
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", nan_empty)
            m.setattr(torch, "empty_like", nan_empty_like)
            out = tri2d(**leaves)
            grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
        assert all(torch.isfinite(t).all() for t in (out, *grads))
        runs.append((out, grads))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))


def test_backward_split_accumulation_direct():
    """Backward with several channel blocks per program (partial dB / dC accumulated in-program) == one per program."""
    from metaformer_zoo.kernels.selective_scan2d import triton as tk
    gen = torch.Generator().manual_seed(9)
    a = make2d(1, 20, 2, 3, 2, gen=gen)  # 3 channel blocks of 8
    fwd_args = (a["x"], a["delta"], a["A"], a["B"], a["C"], a["D"], None, a["delta_bias"], True, 4, 1)
    out, states = tk.scan_fwd(*fwd_args, torch.float32)
    g = torch.randn(out.shape, generator=gen)
    r1 = tk.scan_bwd(g, *fwd_args[:8], states, True, 4, 1, d_per_prog=1)
    r2 = tk.scan_bwd(g, *fwd_args[:8], states, True, 4, 1, d_per_prog=2)
    r3 = tk.scan_bwd(g, *fwd_args[:8], states, True, 4, 1, atomic=True)  # opt-in atomics path
    for p, q, w in zip(r1, r2, r3):
        if p is not None:
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
            assert torch.allclose(p, w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# 1D op (channel mixer): grouped / shared / mixed B, C; z; return_last_state
# ----------------------------------------------------------------------------------------------------------------------
def oracle1d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, GB=None, GC=None):
    # the naive oracle needs one group count: expand shared / coarser groups (same semantics)
    G = max(B.shape[1] if B.dim() == 4 else 1, C.shape[1] if C.dim() == 4 else 1)

    def expand(t):
        t = t.unsqueeze(1) if t.dim() == 3 else t
        return t.repeat_interleave(G // t.shape[1], dim=1)
    return reference.selective_scan_ref_naive(u, delta, A, expand(B), expand(C), D, z, delta_bias, delta_softplus)


def tri1d(**kw):
    return ss.selective_scan(**kw, backend="triton")


CASES_1D = [
    # (batch, dim, L, N, GB, GC, D, z, bias, softplus); G = 0 means shared (batch, N, L)
    (2, 8, 19, 4, 2, 2, True, True, True, True),
    (1, 6, 33, 3, 0, 0, False, False, False, False),
    (2, 12, 9, 4, 0, 3, True, True, False, True),   # mixed: shared B, 3 groups of C
    (1, 16, 5, 2, 2, 4, False, True, True, False),  # mixed 2 / 4 groups
]


@pytest.mark.parametrize("bs,dim,L,N,GB,GC,D,z,bias,softplus", CASES_1D)
def test_selective_scan_1d_triton_fwd_bwd(bs, dim, L, N, GB, GC, D, z, bias, softplus):
    gen = torch.Generator().manual_seed(dim * 100 + L)

    def bc(G):
        return torch.randn(bs, N, L, generator=gen) if G == 0 else torch.randn(bs, G, N, L, generator=gen)
    args = dict(u=torch.randn(bs, dim, L, generator=gen), delta=torch.randn(bs, dim, L, generator=gen) * 0.5,
                A=-(torch.rand(dim, N, generator=gen) + 0.1), B=bc(GB), C=bc(GC),
                D=torch.randn(dim, generator=gen) if D else None,
                z=torch.randn(bs, dim, L, generator=gen) if z else None,
                delta_bias=torch.randn(dim, generator=gen) * 0.3 if bias else None)
    check_fwd_bwd(tri1d, oracle1d, args, delta_softplus=softplus)


def test_selective_scan_1d_softplus_extremes():
    """delta + bias far below -15 and above 20: the softplus branches (and its gradient) match torch's."""
    gen = torch.Generator().manual_seed(8)
    bs, dim, L, N = 1, 4, 12, 2
    delta = torch.randn(bs, dim, L, generator=gen) * 30
    args = dict(u=torch.randn(bs, dim, L, generator=gen), delta=delta, A=-(torch.rand(dim, N, generator=gen) + 0.1),
                B=torch.randn(bs, N, L, generator=gen), C=torch.randn(bs, N, L, generator=gen) * 0.1,
                D=None, z=None, delta_bias=torch.randn(dim, generator=gen))
    assert (delta < -16).any() and (delta > 21).any()
    check_fwd_bwd(tri1d, oracle1d, args, delta_softplus=True)


def test_selective_scan_1d_last_state_and_strided():
    gen = torch.Generator().manual_seed(1)
    bs, dim, L, N = 2, 4, 21, 4
    u = torch.randn(bs, L, dim, generator=gen).transpose(1, 2)  # (B, D, L) view of a (B, L, D) tensor
    delta = torch.randn(bs, L, dim, generator=gen).transpose(1, 2) * 0.5
    A = -torch.rand(dim, N, generator=gen) - 0.1
    B, C = torch.randn(bs, 2, N, L, generator=gen), torch.randn(bs, 2, N, L, generator=gen)
    z = torch.randn(bs, L, dim, generator=gen).transpose(1, 2)
    out, last = ss.selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, return_last_state=True,
                                  backend="triton")
    ref, ref_last = reference.selective_scan_ref_naive(*(t.double() for t in (u, delta, A, B, C)), None, z.double(),
                                                       None, True, True)
    assert rel(out, ref) < TOL and rel(last, ref_last) < TOL
    assert last.shape == (bs, dim, N) and last.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# dispatch, errors, custom-op registration
# ----------------------------------------------------------------------------------------------------------------------
def test_dispatch_rules(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", x) == "reference"  # CPU tensor, interpreter off
    assert resolve_backend("triton", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", x) == "triton"
    assert resolve_backend("reference", x) == "reference"
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "reference")
    assert resolve_backend("auto", x) == "reference"
    with pytest.raises(ValueError, match="backend"):
        ss.selective_scan2d(**make2d(1, 1, 2, 2, 2), backend="cuda")


def test_auto_uses_the_cpu_kernel_on_cpu_without_interpreter(monkeypatch):
    """auto on CPU tensors: the C kernel where it builds (else the reference), never Triton."""
    from metaformer_zoo.kernels.selective_scan2d import cpu
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    real_ref, real_cpu = reference.selective_scan2d, cpu.scan
    monkeypatch.setattr(reference, "selective_scan2d", lambda *a, **k: calls.append("reference") or real_ref(*a, **k))
    monkeypatch.setattr(cpu, "scan", lambda *a, **k: calls.append("cpu") or real_cpu(*a, **k))
    a = make2d(1, 2, 2, 3, 2)
    out = ss.selective_scan2d(**a)
    assert calls == (["cpu"] if cpu.available() else ["reference"])
    assert rel(out, oracle2d(**{k: v.double() for k, v in a.items()})) < TOL
    calls.clear()
    ss.selective_scan2d(**a, backend="reference")
    assert calls == ["reference"]


def test_subprocess_without_interpreter_uses_reference():
    """A fresh interpreter without TRITON_INTERPRET: auto -> reference, and the Triton module is never imported."""
    code = ("import sys, torch\n"
            "from metaformer_zoo.kernels import selective_scan2d as ss\n"
            "x = torch.randn(1, 2, 2, 3); L = 6\n"
            "y = ss.selective_scan2d(x, torch.rand(1, 4, 2, L), -torch.rand(8, 2), torch.randn(1, 4, 2, L),\n"
            "                        torch.randn(1, 4, 2, L))\n"
            "assert y.shape == x.shape\n"
            "print('triton-imported', 'metaformer_zoo.kernels.selective_scan2d.triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "METAFORMER_ZOO_KERNELS")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "triton-imported False" in res.stdout


def test_bad_shapes_raise_clear_errors():
    a = make2d(1, 2, 2, 3, 2)
    with pytest.raises(ValueError, match="delta must be"):
        tri2d(**{**a, "delta": a["delta"][:, :3]})
    with pytest.raises(ValueError, match="A must be"):
        tri2d(**{**a, "A": a["A"][:4]})
    with pytest.raises(ValueError, match="B must be"):
        tri2d(**{**a, "B": a["B"][..., :5]})
    with pytest.raises(ValueError, match="D must be"):
        tri2d(**{**a, "D": a["D"][:3]})
    u = torch.randn(1, 6, 5)
    with pytest.raises(ValueError, match="divisible by G"):
        ss.selective_scan(u, u, -torch.rand(6, 2), torch.randn(1, 4, 2, 5), torch.randn(1, 4, 2, 5), backend="triton")


def test_torch_compile_fullgraph_single_op():
    """torch.compile (fullgraph, no graph break) and make_fx see the Triton path as one custom op node."""
    from torch.fx.experimental.proxy_tensor import make_fx
    gen = torch.Generator().manual_seed(2)
    a = make2d(1, 2, 2, 3, 2, gen=gen)
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items()}

    def f(x, delta, A, B, C, D, delta_bias):
        return ss.selective_scan2d(x, delta, A, B, C, D, delta_bias, backend="triton") * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(**leaves)
    eager = f(**leaves)
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)
    gc = torch.autograd.grad(out.sum(), list(leaves.values()))
    ge = torch.autograd.grad(eager.sum(), list(leaves.values()))
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-6) for p, q in zip(gc, ge))
    gm = make_fx(f, tracing_mode="fake")(*a.values())
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count("metaformer_zoo.selective_scan_fwd.default") == 1, targets


def test_opcheck_custom_ops():
    gen = torch.Generator().manual_seed(4)
    a = make2d(1, 1, 2, 2, 2, gen=gen)
    args = (a["x"], a["delta"], a["A"], a["B"], a["C"], a["D"], None, a["delta_bias"], True, True)
    torch.library.opcheck(torch.ops.metaformer_zoo.selective_scan_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------------------------------------------------
# compiled kernels on a real GPU (this file runs the interpreter, so the check runs in a fresh process without it)
# ----------------------------------------------------------------------------------------------------------------------
_GPU_CHECK = r"""
import torch
from metaformer_zoo.kernels.selective_scan2d import selective_scan2d, selective_scan, reference
torch.manual_seed(0)
def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
for (Bsz, Ch, H, W, N) in ((2, 96, 14, 14, 16), (2, 40, 7, 9, 16), (1, 8, 56, 56, 16)):
    L = H * W
    x = torch.randn(Bsz, Ch, H, W, device="cuda").contiguous(memory_format=torch.channels_last)
    ins = [x, torch.randn(Bsz, 4, Ch, L, device="cuda") * 0.5 - 1, -torch.rand(4 * Ch, N, device="cuda") * 4 - 0.1,
           torch.randn(Bsz, 4, N, L, device="cuda"), torch.randn(Bsz, 4, N, L, device="cuda"),
           torch.randn(4 * Ch, device="cuda"), torch.randn(4 * Ch, device="cuda") * 0.3]
    ins = [t.requires_grad_(True) for t in ins]
    out = selective_scan2d(*ins, backend="triton")
    ref = reference.selective_scan2d(*[t.double() for t in ins])
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, ins, g)
    gb = torch.autograd.grad(ref, ins, g.double())
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(ga, gb)]
    assert max(errs) < 1e-4, (Bsz, Ch, H, W, errs)
u = torch.randn(4096, 32, 12, device="cuda", requires_grad=True)
dl = torch.randn(4096, 32, 12, device="cuda", requires_grad=True)
A = -torch.arange(1, 17, device="cuda", dtype=torch.float32).repeat(32, 1)
Bm, Cm = torch.randn(4096, 2, 16, 12, device="cuda"), torch.randn(4096, 2, 16, 12, device="cuda")
o = selective_scan(u, dl, A, Bm, Cm, None, None, None, True, backend="triton")
r = reference.selective_scan(u.double(), dl.double(), A, Bm, Cm, None, None, None, True)
assert rel(o, r) < 1e-4, rel(o, r)
print("gpu-ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_gpu_match_reference():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "METAFORMER_ZOO_KERNELS")}
    res = subprocess.run([sys.executable, "-c", _GPU_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "gpu-ok" in res.stdout, res.stderr[-3000:]

"""The compiled CPU kernel of the selective scan (kernels/selective_scan2d/scan_cpu.c) against the float64 oracles:
forward, last state and every gradient, 1D (grouped / shared B, C; odd L; N = 1 and 16) and the fused 2D op; the
dispatch (``auto`` picks it on CPU, ``reference`` skips it) and the fallback when it cannot be built."""
import math
import warnings

import pytest
import torch

import metaformer_zoo.kernels as K
from metaformer_zoo.kernels import resolve_backend
from metaformer_zoo.kernels import selective_scan2d as ss
from metaformer_zoo.kernels.selective_scan2d import cpu, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no C compiler: {cpu.build_error()}")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scan_inputs(b, d, L, N, G, dtype, seed=0):
    g = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    B = r(b, G, N, L) if G else r(b, N, L)
    C = r(b, G, N, L) if G else r(b, N, L)
    return dict(u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-(torch.rand(d, N, generator=g, dtype=dtype) * 2 + 0.1),
                B=B, C=C, D=r(d), z=r(b, d, L), delta_bias=r(d) * 0.3)


def _run(fn, inputs, seed=1):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    out = fn(**leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = _gen(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [o.detach() for o in outs], dict(zip(leaves, grads))


CASES = [  # b, d, L, N, G (0: shared (batch, N, L) B / C), use_z, softplus, last_state
    (2, 6, 13, 16, 2, True, True, True),
    (1, 4, 7, 1, 1, False, True, False),
    (3, 8, 33, 4, 4, True, False, True),
    (2, 6, 1, 16, 0, False, True, True),
    (2, 4, 9, 5, 2, True, True, False),  # N without a compile-time specialisation
    (2, 40, 150, 16, 2, True, True, True),  # 20-channel groups: a full and a 4-wide block; L over 2 checkpoints
    (1, 17, 70, 8, 0, False, True, True),  # one 17-channel group: a 1-wide tail block
]


@pytest.mark.parametrize("b,d,L,N,G,use_z,softplus,last", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selective_scan_cpu_matches_float64_recurrence(b, d, L, N, G, use_z, softplus, last, dtype):
    inputs = _scan_inputs(b, d, L, N, G, dtype)
    if not use_z:
        inputs["z"] = None

    def kernel(**a):
        return ss.selective_scan(**a, delta_softplus=softplus, return_last_state=last, backend="cpu")

    def oracle(**a):
        a = {k: v.double() for k, v in a.items()}
        return ss.selective_scan_ref_naive(**a, delta_softplus=softplus, return_last_state=last)

    got, got_g = _run(kernel, inputs)
    want, want_g = _run(oracle, inputs)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert got[0].dtype == dtype
    for o, w in zip(got, want):
        torch.testing.assert_close(o.double(), w.double(), **tol)
    assert set(got_g) == set(inputs) - ({"z"} if not use_z else set())
    for k in got_g:
        assert got_g[k].dtype == dtype, k
        scale = want_g[k].double().abs().max().clamp_min(1.0)
        torch.testing.assert_close(got_g[k].double() / scale, want_g[k].double() / scale, **tol,
                                   msg=lambda m, k=k: f"d{k}: {m}")


@pytest.mark.parametrize("H,W,N,Ch", [(3, 4, 16, 5), (5, 2, 1, 5), (4, 4, 3, 5), (9, 13, 16, 21)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selective_scan2d_cpu_matches_reference(H, W, N, Ch, dtype):
    g = _gen(3)
    Bsz, L = 2, H * W
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    inputs = dict(x=r(Bsz, Ch, H, W), delta=r(Bsz, 4, Ch, L) * 0.5,
                  A=-(torch.rand(4 * Ch, N, generator=g, dtype=dtype) + 0.1), B=r(Bsz, 4, N, L),
                  C=r(Bsz, 4, N, L), D=r(4 * Ch), delta_bias=r(4 * Ch) * 0.3)
    got, got_g = _run(lambda **a: ss.selective_scan2d(**a, backend="cpu"), inputs)
    # the oracle: cross_scan -> the naive float64 recurrence per route -> cross_merge
    def oracle(x, delta, A, B, C, D, delta_bias):
        xs = reference.cross_scan(x.double()).reshape(Bsz, 4 * Ch, L)
        ys = ss.selective_scan_ref_naive(xs, delta.double().reshape(Bsz, 4 * Ch, L), A.double(), B.double(),
                                         C.double(), D.double(), None, delta_bias.double(), True)
        return reference.cross_merge(ys.view(Bsz, 4, Ch, L), H, W)
    want, want_g = _run(oracle, inputs)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got[0].double(), want[0].double(), **tol)
    for k in inputs:
        scale = want_g[k].double().abs().max().clamp_min(1.0)
        torch.testing.assert_close(got_g[k].double() / scale, want_g[k].double() / scale, **tol,
                                   msg=lambda m, k=k: f"d{k}: {m}")


@pytest.mark.parametrize("low_rank", [False, True])
def test_backward_without_forward_checkpoints_matches(low_rank):
    """The backward op takes its own checkpoints when the forward saved none (ck=None): same gradients (also with the
    low-rank delta, whose recompute forms delta from dt_w again)."""
    g = _gen(5)
    Bsz, L, Ch, R, N, H, W = 2, 9 * 15, 20, 4, 16, 9, 15
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(Bsz, L, Ch)
    dt_w = r(R, 3, Ch) * 0.5 if low_rank else None
    delta = r(Bsz, R, L, 3) if low_rank else r(Bsz, R, L, Ch) * 0.5
    A, B, C = -(torch.rand(R, N, Ch, generator=g) + 0.1), r(Bsz, R, L, N), r(Bsz, R, L, N)
    D, bias = r(R, Ch), r(R, Ch) * 0.3
    ops = torch.ops.metaformer_zoo
    y, _, ck = ops.selective_scan_cpu_fwd(u, delta, A, B, C, D, bias, dt_w, True, R, 1, H, W, True)
    y2, _, none = ops.selective_scan_cpu_fwd(u, delta, A, B, C, D, bias, dt_w, True, R, 1, H, W, False)
    assert torch.equal(y, y2) and none.numel() == 0 and ck.shape[:3] == (Bsz, R, math.ceil(L / cpu._TCH))
    gy = r(Bsz, L, Ch)
    with_ck = ops.selective_scan_cpu_bwd(gy, None, u, delta, A, B, C, D, bias, dt_w, ck, True, R, 1, H, W)
    without = ops.selective_scan_cpu_bwd(gy, None, u, delta, A, B, C, D, bias, dt_w, None, True, R, 1, H, W)
    for a, b in zip(with_ck, without):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _check_fused_against_projected(fused, projected, inputs, dtype, reference_call):
    """The low-rank call equals the call on the projected delta (float64): output and every input's gradient; the
    reference backend, given the same low-rank arguments, projects first and agrees too."""
    got, got_g = _run(fused, inputs)
    want, want_g = _run(projected, inputs)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0].double(), want[0].double(), **tol)
    assert set(got_g) == set(inputs)
    for k in inputs:
        scale = want_g[k].double().abs().max().clamp_min(1.0)
        torch.testing.assert_close(got_g[k].double() / scale, want_g[k].double() / scale, **tol,
                                   msg=lambda m, k=k: f"d{k}: {m}")
    ref = reference_call(**{k: v.detach() for k, v in inputs.items()})
    torch.testing.assert_close(ref.double(), want[0].double(), **tol)


@pytest.mark.parametrize("N,Ch,Rdt", [(16, 21, 3), (3, 18, 2), (16, 32, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_delta_matches_the_projected_delta(N, Ch, Rdt, dtype):
    """``selective_scan2d_tokens(dt_proj=W)`` (the C kernel forms delta from its low-rank input at every step) equals
    the same call on ``einsum(delta_in, W)``: forward and every gradient, dt_proj's included; odd channel counts (a
    partial block), N with and without the register path, L over two checkpoint chunks."""
    g = _gen(11)
    Bsz, H, W = 2, 9, 13
    L = H * W
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    inputs = dict(u=r(Bsz, H, W, Ch), delta=r(Bsz, 4, L, Rdt), dt_proj=r(4, Ch, Rdt) * 0.5,
                  A=-(torch.rand(4 * Ch, N, generator=g, dtype=dtype) + 0.1), B=r(Bsz, 4, L, N), C=r(Bsz, 4, L, N),
                  D=r(4 * Ch), delta_bias=r(4 * Ch) * 0.3)

    def fused(u, delta, dt_proj, **a):
        return ss.selective_scan2d_tokens(u, delta, **a, dt_proj=dt_proj, backend="cpu")

    def projected(u, delta, dt_proj, **a):
        a = {k: v.double() for k, v in a.items()}
        full = torch.einsum("brlj,rcj->brlc", delta.double(), dt_proj.double())
        return ss.selective_scan2d_tokens(u.double(), full, **a, backend="cpu")

    _check_fused_against_projected(fused, projected, inputs, dtype,
                                   lambda **a: ss.selective_scan2d_tokens(**a, backend="reference"))


@pytest.mark.parametrize("Gd,Rdt,G", [(2, 1, 2), (1, 3, 1), (4, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_low_rank_delta_1d_matches_the_projected_delta(Gd, Rdt, G, dtype):
    """``selective_scan_tokens(dt_proj=W)`` with a grouped (Gd, dim / Gd, R) projection (ViM2's channel mixer: one
    per scan direction) equals the call on ``einsum(delta_in, W)``: forward and every gradient, on odd L over two
    checkpoint chunks and a partial channel block; Gd independent of the B / C groups."""
    g = _gen(12)
    b, L, d, N = 3, 70, 40, 16
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    inputs = dict(u=r(b, L, d), delta=r(b, L, Gd, Rdt), dt_proj=r(Gd, d // Gd, Rdt) * 0.5,
                  A=-(torch.rand(d, N, generator=g, dtype=dtype) + 0.1), B=r(b, G, L, N), C=r(b, G, L, N),
                  D=r(d), delta_bias=r(d) * 0.3)

    def fused(u, delta, dt_proj, **a):
        return ss.selective_scan_tokens(u, delta, **a, delta_softplus=True, dt_proj=dt_proj, backend="cpu")

    def projected(u, delta, dt_proj, **a):
        a = {k: v.double() for k, v in a.items()}
        full = torch.einsum("blgj,gcj->blgc", delta.double(), dt_proj.double()).reshape(b, L, d)
        return ss.selective_scan_tokens(u.double(), full, **a, delta_softplus=True, backend="cpu")

    _check_fused_against_projected(fused, projected, inputs, dtype,
                                   lambda **a: ss.selective_scan_tokens(**a, delta_softplus=True, backend="reference"))


def test_low_rank_delta_shape_errors_say_what_is_expected():
    u, A = torch.randn(1, 3, 4, 8), -torch.rand(32, 4)
    B = C = torch.randn(1, 4, 12, 4)
    with pytest.raises(ValueError, match=r"low-rank input \(B, 4, H\*W, R\)"):
        ss.selective_scan2d_tokens(u, torch.randn(1, 4, 12, 2), A, B, C, dt_proj=torch.randn(4, 8, 3))
    with pytest.raises(ValueError, match=r"low-rank input \(batch, L, Gd, R\)"):
        ss.selective_scan_tokens(torch.randn(2, 5, 8), torch.randn(2, 5, 8), -torch.rand(8, 4),
                                 torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4), dt_proj=torch.randn(2, 4, 1))


def test_token_layout_entry_matches_the_channels_first_op():
    """``selective_scan2d_tokens`` (channels-last u, map-order delta / B / C: what SS2D feeds it) equals
    ``selective_scan2d`` on the same values in its layout, values and every gradient, on the C kernel and on the
    reference path."""
    g = _gen(6)
    Bsz, Ch, H, W, N = 2, 18, 5, 7, 4
    L = H * W
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = dict(u=r(Bsz, H, W, Ch), delta=r(Bsz, 4, L, Ch) * 0.5,
                  A=-(torch.rand(4 * Ch, N, generator=g, dtype=torch.float64) + 0.1), B=r(Bsz, 4, L, N),
                  C=r(Bsz, 4, L, N), D=r(4 * Ch), delta_bias=r(4 * Ch) * 0.3)

    def channels_first(u, delta, A, B, C, D, delta_bias):
        routes = lambda t: reference.map_to_routes(t.transpose(-1, -2), H, W)  # noqa: E731
        y = ss.selective_scan2d(u.permute(0, 3, 1, 2), routes(delta), A, routes(B), routes(C), D, delta_bias,
                                backend="reference")
        return y.permute(0, 2, 3, 1)

    want, want_g = _run(channels_first, inputs)
    for backend in ("cpu", "reference"):
        got, got_g = _run(lambda **a: ss.selective_scan2d_tokens(**a, backend=backend), inputs)
        assert got[0].shape == (Bsz, H, W, Ch)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
        for k in inputs:
            torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"d{k}: {m}")


def test_token_major_1d_entry_matches_selective_scan():
    """``selective_scan_tokens`` (u, delta (batch, L, dim), grouped B / C (batch, G, L, N): ViM2's channel mixer)
    equals ``selective_scan`` on the transposed values, values and every gradient, on the C kernel and the
    reference path; strided B / C views (slices of one projection) are read in place."""
    g = _gen(7)
    b, L, d, G, N = 3, 11, 32, 2, 16
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    proj = r(b, L, G, 2 * N + 3)
    inputs = dict(u=r(b, L, d), delta=r(b, L, d) * 0.5, A=-(torch.rand(d, N, generator=g, dtype=torch.float64) + 0.1),
                  proj=proj, D=r(d), delta_bias=r(d) * 0.3)

    def split(proj):
        return proj[..., 3:3 + N].permute(0, 2, 1, 3), proj[..., 3 + N:].permute(0, 2, 1, 3)  # (b, G, L, N) views

    def channels_first(u, delta, A, proj, D, delta_bias):
        B, C = split(proj)
        return ss.selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(-1, -2),
                                 C.transpose(-1, -2), D, None, delta_bias, True, backend="reference").transpose(1, 2)

    want, want_g = _run(channels_first, inputs)
    for backend in ("cpu", "reference"):
        def tokens(u, delta, A, proj, D, delta_bias):
            B, C = split(proj)
            return ss.selective_scan_tokens(u, delta, A, B, C, D, delta_bias, True, backend=backend)
        got, got_g = _run(tokens, inputs)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
        for k in inputs:
            torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-10, atol=1e-10, msg=lambda m, k=k: f"d{k}: {m}")
    with pytest.raises(ValueError, match="divisible by G"):
        ss.selective_scan_tokens(inputs["u"], inputs["delta"], inputs["A"], r(b, 3, L, N), r(b, 3, L, N))


def test_cpu_kernel_results_do_not_depend_on_the_thread_count():
    inputs = _scan_inputs(1, 16, 40, 16, 2, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_g = _run(lambda **a: ss.selective_scan(**a, delta_softplus=True, backend="cpu"), inputs)
        torch.set_num_threads(3)
        three, three_g = _run(lambda **a: ss.selective_scan(**a, delta_softplus=True, backend="cpu"), inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], three[0])  # forward units are per channel: bitwise equal
    for k in one_g:  # dB / dC / dA are summed over per-block partials, whose count follows the threads
        torch.testing.assert_close(one_g[k], three_g[k], rtol=1e-5, atol=1e-5)


def test_auto_picks_the_cpu_kernel_and_reference_skips_it(monkeypatch):
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1)
    assert resolve_backend("auto", x, op=ss.OP) == "cpu"
    assert resolve_backend("reference", x, op=ss.OP) == "reference"
    assert resolve_backend("cpu", x, op="fft_filter") == "reference"  # ops without a C kernel read it as auto
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "reference")
    assert resolve_backend("auto", x, op=ss.OP) == "reference"
    # the model path: a ViM2 SS2D call on CPU runs the custom op
    from metaformer_zoo.mixers.vim2 import SS2D
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS")
    m = SS2D(8, d_state=4).eval()
    with torch.no_grad(), torch.profiler.profile() as prof:
        y_cpu = m(torch.randn(1, 8, 5, 6, generator=_gen(0)))
    assert any("selective_scan_cpu_fwd" in e.name for e in prof.events())
    m.backend = "reference"
    with torch.no_grad():
        y_ref = m(torch.randn(1, 8, 5, 6, generator=_gen(0)))
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-5, atol=1e-5)


def test_unbuildable_kernel_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("METAFORMER_ZOO_CACHE", "/nonexistent-cache-dir-for-test")  # no cached build to find
    K.reset_kernel_failures()
    inputs = _scan_inputs(2, 4, 9, 4, 2, torch.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = ss.selective_scan(**inputs, delta_softplus=True)
        again = ss.selective_scan(**inputs, delta_softplus=True)
    msgs = [str(x.message) for x in w if "CPU kernel" in str(x.message)]
    assert len(msgs) == 1 and "unavailable" in msgs[0] and "compiler" in msgs[0], msgs
    assert cpu.build_error() is not None
    want = reference.selective_scan(**inputs, delta_softplus=True)
    assert torch.equal(got, want) and torch.equal(again, want)
    K.reset_kernel_failures()


def test_cpu_kernel_call_that_fails_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    K.reset_kernel_failures()

    def broken(*a, **k):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(cpu, "scan", broken)
    inputs = _scan_inputs(2, 4, 9, 4, 2, torch.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = ss.selective_scan(**inputs, delta_softplus=True, backend="cpu")
        ss.selective_scan(**inputs, delta_softplus=True, backend="cpu")
    msgs = [str(x.message) for x in w if "CPU kernel of selective_scan2d failed" in str(x.message)]
    assert len(msgs) == 1 and "simulated kernel failure" in msgs[0]
    torch.testing.assert_close(got, reference.selective_scan(**inputs, delta_softplus=True))
    K.reset_kernel_failures()


def test_low_rank_kernel_call_that_fails_falls_back_with_one_warning(monkeypatch):
    """A failing kernel call with the low-rank delta (2D and grouped 1D) warns once and the reference computes the
    same result from the projected delta."""
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    K.reset_kernel_failures()
    g = _gen(13)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    args2d = dict(u=r(1, 3, 5, 8), delta=r(1, 4, 15, 2), A=-(torch.rand(32, 4, generator=g) + 0.1), B=r(1, 4, 15, 4),
                  C=r(1, 4, 15, 4), D=r(32), delta_bias=r(32), dt_proj=r(4, 8, 2))
    args1d = dict(u=r(2, 7, 8), delta=r(2, 7, 2, 1), A=-(torch.rand(8, 4, generator=g) + 0.1), B=r(2, 2, 7, 4),
                  C=r(2, 2, 7, 4), D=r(8), delta_bias=r(8), dt_proj=r(2, 4, 1), delta_softplus=True)
    want2d = ss.selective_scan2d_tokens(**args2d, backend="cpu")
    want1d = ss.selective_scan_tokens(**args1d, backend="cpu")

    def broken(*a, **k):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(cpu, "scan_tokens", broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got2d = ss.selective_scan2d_tokens(**args2d, backend="cpu")
        got1d = ss.selective_scan_tokens(**args1d, backend="cpu")
        ss.selective_scan_tokens(**args1d, backend="cpu")
    msgs = [str(x.message) for x in w if "CPU kernel of selective_scan2d failed" in str(x.message)]
    assert len(msgs) == 1 and "simulated kernel failure" in msgs[0]
    torch.testing.assert_close(got2d, want2d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got1d, want1d, rtol=1e-5, atol=1e-5)
    K.reset_kernel_failures()


def test_cpu_ops_trace_as_one_node():
    inputs = _scan_inputs(1, 4, 6, 4, 1, torch.float32)
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(lambda u, delta, A, B, C: ss.selective_scan(u, delta, A, B, C, delta_softplus=True, backend="cpu"))(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert any("selective_scan_cpu_fwd" in str(n.target) for n in gm.graph.nodes)

"""The plain-PyTorch selective scan (kernels/selective_scan2d/reference.py) against a direct float64 recurrence."""
import pytest
import torch

from metaformer_zoo.kernels import selective_scan2d as ops
from metaformer_zoo.kernels.selective_scan2d import reference as ref


def _inputs(b=2, d=8, L=13, N=4, G=2, dtype=torch.float64, seed=0, grouped=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa
    u = r(b, d, L)
    delta = r(b, d, L) * 0.5
    A = -(torch.rand(d, N, generator=g, dtype=dtype) * 2 + 0.1)
    B = r(b, G, N, L) if grouped else r(b, N, L)
    C = r(b, G, N, L) if grouped else r(b, N, L)
    D = r(d)
    z = r(b, d, L)
    delta_bias = r(d) * 0.3
    return u, delta, A, B, C, D, z, delta_bias


CASES = [
    # grouped, use_D, use_z, use_bias, softplus, last_state, chunk
    (True, True, True, True, True, True, 4),
    (True, False, False, False, False, False, 5),
    (False, True, False, True, True, True, 32),
    (False, False, True, False, True, False, 1),
    (True, True, True, False, False, True, 13),
]


@pytest.mark.parametrize("grouped,use_D,use_z,use_bias,softplus,last_state,chunk", CASES)
@pytest.mark.parametrize("ckpt", [True, False])
def test_selective_scan_matches_float64_recurrence(grouped, use_D, use_z, use_bias, softplus, last_state, chunk, ckpt):
    u, delta, A, B, C, D, z, delta_bias = _inputs(grouped=grouped)
    args = [u, delta, A, B, C, D if use_D else None, z if use_z else None, delta_bias if use_bias else None]
    leaves = [t.requires_grad_() for t in args if t is not None]
    out = ref.selective_scan(*args, delta_softplus=softplus, return_last_state=last_state, chunk_size=chunk,
                             checkpoint_chunks=ckpt)
    exp = ref.selective_scan_ref_naive(*args, delta_softplus=softplus, return_last_state=last_state)
    if last_state:
        (out, h), (exp, h_exp) = out, exp
        assert h.shape == (u.shape[0], u.shape[1], A.shape[1])
        torch.testing.assert_close(h, h_exp, rtol=1e-10, atol=1e-10)
    assert out.shape == u.shape and out.dtype == u.dtype
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    loss = (out * w).sum() + (h.square().sum() if last_state else 0)
    loss_exp = (exp * w).sum() + (h_exp.square().sum() if last_state else 0)
    grads = torch.autograd.grad(loss, leaves)
    grads_exp = torch.autograd.grad(loss_exp, leaves)
    for g, ge in zip(grads, grads_exp):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, ge, rtol=1e-9, atol=1e-9)


def test_selective_scan_public_api_float32():
    u, delta, A, B, C, D, z, delta_bias = _inputs(b=1, d=16, L=70, N=16, G=4, dtype=torch.float32, seed=3)
    out = ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend="reference")
    exp = ref.selective_scan_ref_naive(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-4)
    # bfloat16 inputs: float32 accumulation inside, bfloat16 out
    out16 = ref.selective_scan(u.bfloat16(), delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    assert out16.dtype == torch.bfloat16


def test_checkpointed_scan_saves_no_full_state():
    """Under autograd the chunked scan keeps only chunk-start states: nothing of size (B, D, L, N) is saved."""
    b, d, L, N = 1, 16, 96, 16
    u, delta, A, B, C, D, z, delta_bias = _inputs(b=b, d=d, L=L, N=N, G=1, dtype=torch.float32)
    u.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ref.selective_scan(u, delta, A, B, C, D, None, delta_bias, True, chunk_size=16)
    assert max(saved) < b * d * L * N // 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref.selective_scan_ref_naive(u, delta, A, B, C, D, None, delta_bias, True)
    assert max(saved) >= b * d * L * N  # the hook does see full-size saves when they happen
    out.sum().backward()
    assert torch.isfinite(u.grad).all()


def test_scan_bad_shapes_raise():
    u, delta, A, B, C, D, z, delta_bias = _inputs(d=8, G=2)
    with pytest.raises(ValueError, match="divisible by G"):
        ref.selective_scan(u, delta, A, B[:, :1].repeat(1, 3, 1, 1), C, D)
    with pytest.raises(ValueError, match="delta must have"):
        ref.selective_scan(u, delta[..., 1:], A, B, C)
    with pytest.raises(ValueError, match="A must be"):
        ref.selective_scan(u, delta, A[1:], B, C)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.selective_scan(u, delta, A, B, C, backend="cuda")


def test_cross_scan_routes_and_adjoint():
    torch.manual_seed(0)
    Bsz, Ch, H, W = 2, 3, 4, 6
    x = torch.randn(Bsz, Ch, H, W, dtype=torch.float64)
    xs = ops.cross_scan(x)
    assert xs.shape == (Bsz, 4, Ch, H * W)
    p = torch.arange(H * W)
    # route 0 row-major (p = h W + w), route 1 column-major (p = w H + h), 2 and 3 their reverses
    torch.testing.assert_close(xs[:, 0], x[:, :, p // W, p % W])
    torch.testing.assert_close(xs[:, 1], x[:, :, p % H, p // H])
    torch.testing.assert_close(xs[:, 2], xs[:, 0].flip(-1))
    torch.testing.assert_close(xs[:, 3], xs[:, 1].flip(-1))
    y = torch.randn(Bsz, 4, Ch, H * W, dtype=torch.float64)
    merged = ops.cross_merge(y, H, W)
    assert merged.shape == x.shape
    torch.testing.assert_close((xs * y).sum(), (x * merged).sum())  # <scan x, y> == <x, merge y>
    torch.testing.assert_close(ops.cross_merge(y.view(Bsz, 4, Ch, H, W)), merged)  # 5-D input carries H, W
    # merge of a scan counts each pixel 4 times
    torch.testing.assert_close(ops.cross_merge(xs, H, W), 4 * x)
    # the adjoint is also what autograd computes
    xg = x.clone().requires_grad_()
    (ops.cross_scan(xg) * y).sum().backward()
    torch.testing.assert_close(xg.grad, merged)
    with pytest.raises(ValueError, match="pass H= and W="):
        ops.cross_merge(y)  # 24 positions: not square, H/W cannot be inferred
    sq = torch.randn(1, 4, 2, 9)
    assert ops.cross_merge(sq).shape == (1, 2, 3, 3)


def _scan2d_inputs(Bsz=2, Ch=4, H=3, W=5, N=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa
    L = H * W
    return (r(Bsz, Ch, H, W), r(Bsz, 4, Ch, L) * 0.5, -(torch.rand(4 * Ch, N, generator=g, dtype=dtype) + 0.2),
            r(Bsz, 4, N, L), r(Bsz, 4, N, L), r(4 * Ch), r(4 * Ch) * 0.3)


def test_selective_scan2d_equals_composition():
    x, delta, A, B, C, D, db = args = _scan2d_inputs()
    leaves = [t.requires_grad_() for t in args]
    Bsz, Ch, H, W = x.shape
    out = ops.selective_scan2d(x, delta, A, B, C, D, db, delta_softplus=True)
    assert out.shape == x.shape
    # composition, built from the float64 oracle and explicit index routes
    xs = ops.cross_scan(x).reshape(Bsz, 4 * Ch, H * W)
    ys = ref.selective_scan_ref_naive(xs, delta.reshape(Bsz, 4 * Ch, H * W), A, B, C, D, None, db, True)
    exp = ops.cross_merge(ys.view(Bsz, 4, Ch, H * W), H, W)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    for g, ge in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((exp * w).sum(), leaves)):
        torch.testing.assert_close(g, ge, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="delta must be"):
        ops.selective_scan2d(x, delta[:, :2], A, B, C)


# ----------------------------------------------------------------------------------------------------------------------
# the chunked scan's hand-written backward (reference.selective_scan's default under autograd)
# ----------------------------------------------------------------------------------------------------------------------
CHUNKED = [
    # b, d, L, N, GB, GC, chunk   (G = 0: shared (batch, N, L) B / C)
    (2, 6, 37, 1, 2, 2, 8),     # N = 1, odd L, last chunk partial
    (1, 8, 41, 16, 4, 4, 16),   # N = 16, 4 groups
    (2, 12, 19, 16, 0, 3, 5),   # shared B, 3 groups of C (mixed group counts)
    (1, 8, 23, 3, 2, 4, 32),    # mixed 2 / 4 groups, one chunk
    (2, 8, 9, 16, 2, 2, 64),    # N = 16, L < chunk
    (1, 4, 2, 16, 1, 1, 32),    # two steps (dA needs a nonzero h_{t-1})
    (3, 6, 33, 1, 3, 0, 1),     # N = 1, one step per chunk, 3 groups of B / shared C
]


@pytest.mark.parametrize("b,d,L,N,GB,GC,chunk", CHUNKED)
def test_chunked_scan_matches_float64_recurrence(b, d, L, N, GB, GC, chunk):
    g = torch.Generator().manual_seed(b * 100 + L)
    f = torch.float64

    def bc(G):
        return torch.randn(b, N, L, generator=g, dtype=f) if G == 0 else torch.randn(b, G, N, L, generator=g, dtype=f)
    args = [torch.randn(b, d, L, generator=g, dtype=f), torch.randn(b, d, L, generator=g, dtype=f) * 0.5,
            -(torch.rand(d, N, generator=g, dtype=f) * 2 + 0.1), bc(GB), bc(GC), torch.randn(d, generator=g, dtype=f),
            torch.randn(b, d, L, generator=g, dtype=f), torch.randn(d, generator=g, dtype=f) * 0.3]
    leaves = [t.requires_grad_() for t in args]
    G = max(GB, GC, 1)

    def oracle(u, delta, A, B, C, D, z, bias):  # the naive oracle needs one group count
        ex = lambda t: (t.unsqueeze(1) if t.dim() == 3 else t).repeat_interleave(  # noqa: E731
            G // (1 if t.dim() == 3 else t.shape[1]), 1)
        return ref.selective_scan_ref_naive(u, delta, A, ex(B), ex(C), D, z, bias, True, True)

    out, h = ref.selective_scan(*args, delta_softplus=True, return_last_state=True, chunk_size=chunk)
    exp, h_exp = oracle(*args)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_exp, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, generator=g, dtype=f)
    grads = torch.autograd.grad((out * w).sum() + h.square().sum(), leaves)
    grads_exp = torch.autograd.grad((exp * w).sum() + h_exp.square().sum(), leaves, retain_graph=True)
    for name, a, e in zip("u delta A B C D z bias".split(), grads, grads_exp):
        assert a.shape == e.shape and a.abs().max() > 0, name
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")
    # the explicit backward (used where autograd does not record, e.g. the kernel fallback) gives the same gradients
    explicit = ref.selective_scan_backward(w, *[t.detach() for t in args], delta_softplus=True, chunk_size=chunk)
    grads_y = torch.autograd.grad((exp * w).sum(), leaves)
    for name, a, e in zip("u delta A B C D z bias".split(), explicit, grads_y):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"explicit grad {name}: {m}")


def test_chunked_scan_2d_explicit_backward():
    x, delta, A, B, C, D, db = args = _scan2d_inputs(Bsz=1, Ch=3, H=5, W=3, N=16, seed=4)
    leaves = [t.requires_grad_() for t in args]
    out = ref.selective_scan2d(*leaves, delta_softplus=True, chunk_size=4)
    w = torch.randn_like(out)
    want = torch.autograd.grad((out * w).sum(), leaves)
    got = ref.selective_scan2d_backward(w, *[t.detach() for t in args], delta_softplus=True, chunk_size=4)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_chunked_scan_float32_and_memory_bound(monkeypatch):
    """float32 against the float64 oracle; with tiny chunk temporaries the saved tensors stay far below (B, D, L, N)."""
    monkeypatch.setattr(ref, "MAX_CHUNK_ELEMENTS", 4096)  # forces 8-step chunks at this shape
    b, d, L, N = 1, 32, 133, 16
    u, delta, A, B, C, D, z, delta_bias = _inputs(b=b, d=d, L=L, N=N, G=4, dtype=torch.float32, seed=5)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, True)
    assert max(saved) < b * d * L * N // 4  # inputs and the (L / 8, b, d, N) chunk-start states only
    exp = ref.selective_scan_ref_naive(*[t.double() for t in (u, delta, A, B, C, D, z, delta_bias)], True)
    assert ((out.double() - exp).norm() / exp.norm()).item() < 1e-5
    grads = torch.autograd.grad(out.sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in (u, delta, A, B, C)]
    exp64 = ref.selective_scan_ref_naive(*leaves64, D.double(), z.double(), delta_bias.double(), True)
    for a, e in zip(grads, torch.autograd.grad(exp64.sum(), leaves64)):
        assert ((a.double() - e).norm() / e.norm()).item() < 1e-5


def test_chunked_scan_strided_inputs():
    """Non-contiguous (permuted / sliced) inputs give the contiguous result: the in-place chunk work tensors are laid
    out step-major whatever the inputs' strides."""
    b, d, L, N, G = 2, 8, 29, 16, 2
    u, delta, A, B, C, D, z, delta_bias = _inputs(b=b, d=d, L=L, N=N, G=G, seed=7)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (u, delta, B, C)]
    Bw = torch.stack([B, -B], dim=-1)[..., 0]  # a strided view holding B
    assert not Bw.is_contiguous() and not strided[0].is_contiguous()
    args = [strided[0], strided[1], A, Bw, strided[3], D, z, delta_bias]
    leaves = [t.detach().requires_grad_() for t in args]
    out, h = ref.selective_scan(*leaves, delta_softplus=True, return_last_state=True, chunk_size=8)
    exp, h_exp = ref.selective_scan_ref_naive(u, delta, A, B, C, D, z, delta_bias, True, True)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_exp, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(ref.selective_scan(*args, delta_softplus=True, chunk_size=8), exp,
                                   rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    leaves64 = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
    want = torch.autograd.grad((ref.selective_scan_ref_naive(*leaves64, delta_softplus=True) * w).sum(), leaves64)
    for name, a, e in zip("u delta A B C D z bias".split(), torch.autograd.grad((out * w).sum(), leaves), want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("grad", [False, True])
def test_last_state_owns_its_memory(grad):
    """The returned last state is a (batch, dim, N) tensor of its own, not a view that keeps a chunk's
    (T, batch, dim, N) work tensor alive."""
    u, delta, A, B, C, D, z, delta_bias = _inputs(b=2, d=8, L=40, N=16, G=2, dtype=torch.float32)
    with torch.set_grad_enabled(grad):
        _, h = ref.selective_scan(u.requires_grad_(grad), delta, A, B, C, D, None, delta_bias, True,
                                  return_last_state=True, chunk_size=16)
    assert h.untyped_storage().nbytes() == h.numel() * h.element_size()


def test_chunked_scan_float32_long_sequence():
    """float32 over L = 3136 (a ViM2-T stage-1 route at 224 px) stays within float32 accuracy of float64."""
    u, delta, A, B, C, D, z, delta_bias = _inputs(b=1, d=8, L=3136, N=16, G=1, dtype=torch.float64, seed=7)
    exp = ref.selective_scan_ref_naive(u, delta, A, B, C, D, None, delta_bias, delta_softplus=True)
    f = [t.float() for t in (u, delta, A, B, C, D)]
    out = ref.selective_scan(*f, None, delta_bias.float(), delta_softplus=True)
    torch.testing.assert_close(out.double(), exp, rtol=1e-4, atol=1e-4)

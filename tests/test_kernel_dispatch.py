"""Kernel dispatch: reference by default on CUDA until an op is GPU-verified, safe fallback when a Triton kernel fails
to compile or launch (one warning, same result), and the optional mamba-ssm backend of the selective scan.

CPU only: a failing kernel is simulated by forcing the Triton backend (interpreter) and making the kernel raise
Triton's ``OutOfResources``; the mamba-ssm backend is exercised with a fake ``mamba_ssm`` module.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import metaformer_zoo.kernels as K  # noqa: E402
from metaformer_zoo.kernels import resolve_backend  # noqa: E402
from metaformer_zoo.kernels import selective_scan2d as ss  # noqa: E402
from metaformer_zoo.kernels.selective_scan2d import reference  # noqa: E402

triton = pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402


class _FakeCuda:
    """Stands in for a CUDA tensor in resolve_backend (only ``is_cuda`` is read)."""
    is_cuda = True


@pytest.fixture(autouse=True)
def _fresh_failures():
    K.reset_kernel_failures()
    yield
    K.reset_kernel_failures()


def _raise(*args, **kwargs):
    raise OutOfResources(262144, 232448, "shared memory")


# ----------------------------------------------------------------------------------------------------------------------
# resolve_backend
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", K.OPS)
def test_cuda_default_is_reference_until_gpu_verified(op, monkeypatch):
    monkeypatch.delenv("METAFORMER_ZOO_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t = _FakeCuda()
    assert not K.GPU_VERIFIED[op]  # no kernel has passed its GPU parity test yet (kernels/README.md)
    assert resolve_backend("auto", t, op=op) == "reference"
    monkeypatch.setitem(K.GPU_VERIFIED, op, True)
    assert resolve_backend("auto", t, op=op) == "triton"
    # CPU tensors never pick Triton: the C kernel where the op has one, else the reference
    assert resolve_backend("auto", torch.zeros(1), op=op) == ("cpu" if op in K.CPU_KERNELS else "reference")
    monkeypatch.setitem(K.GPU_VERIFIED, op, False)
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "triton")  # the opt-in keeps its meaning
    assert resolve_backend("auto", t, op=op) == "triton"
    assert resolve_backend("reference", t, op=op) == "reference"
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "mamba_ssm")
    want = "mamba_ssm" if op == "selective_scan2d" else "reference"  # other ops read it as auto
    assert resolve_backend("auto", t, op=op) == want
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "cuda")
    with pytest.raises(ValueError, match="METAFORMER_ZOO_KERNELS"):
        resolve_backend("auto", t, op=op)


# ----------------------------------------------------------------------------------------------------------------------
# fallback when a kernel fails
# ----------------------------------------------------------------------------------------------------------------------
def _scan2d_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    Bsz, Ch, H, W, N = 1, 2, 3, 4, 4
    L = H * W
    return dict(x=torch.randn(Bsz, Ch, H, W, generator=g), delta=torch.randn(Bsz, 4, Ch, L, generator=g) * 0.5,
                A=-(torch.rand(4 * Ch, N, generator=g) + 0.1), B=torch.randn(Bsz, 4, N, L, generator=g),
                C=torch.randn(Bsz, 4, N, L, generator=g), D=torch.randn(4 * Ch, generator=g),
                delta_bias=torch.randn(4 * Ch, generator=g) * 0.3)


def _fwd_bwd(fn, args):
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    return out.detach(), grads


def test_ssd_triton_request_runs_the_selective_scan_kernel_in_the_interpreter():
    """Hydra's SSD scan with backend="triton": the selective-scan Triton kernels (interpreter), forward and every
    gradient against the float64 explicit matrix; auto stays the reference."""
    from metaformer_zoo.kernels import ssd as ssd_ops
    from metaformer_zoo.kernels.ssd import reference as ssd_ref
    g = torch.Generator().manual_seed(0)
    Bsz, L, H, P, G, N = 1, 5, 2, 2, 1, 3
    args = dict(x=torch.randn(Bsz, L, H, P, generator=g), dt=torch.rand(Bsz, L, H, generator=g) + 0.1,
                A=-torch.rand(H, generator=g) - 0.1, B=torch.randn(Bsz, L, G, N, generator=g),
                C=torch.randn(Bsz, L, G, N, generator=g))
    calls = []
    real = ss.selective_scan
    try:
        ss.selective_scan = lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k)
        got, got_g = _fwd_bwd(lambda **a: ssd_ops.ssd(**a, backend="triton"), args)
        ssd_ops.ssd(**args)
    finally:
        ss.selective_scan = real
    assert calls == ["triton"]  # the auto call did not go through the scan
    want, want_g = _fwd_bwd(lambda **a: ssd_ref.ssd_explicit(**{k: v.double() for k, v in a.items()}), args)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(args, got_g, want_g):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "metaformer_zoo.kernels" in str(w.message)]


@pytest.mark.parametrize("fail", ["scan_fwd", "scan_bwd"])
def test_selective_scan2d_failing_kernel_falls_back_once(fail, monkeypatch):
    from metaformer_zoo.kernels.selective_scan2d import triton as tk
    args = _scan2d_args()
    want, want_g = _fwd_bwd(lambda **a: ss.selective_scan2d(**a, backend="reference"), args)
    monkeypatch.setattr(tk, fail, _raise)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            got, got_g = _fwd_bwd(lambda **a: ss.selective_scan2d(**a, backend="triton"), args)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for p, q in zip(got_g, want_g):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    msgs = _fallback_warnings(rec)
    assert len(msgs) == 1, [str(m.message) for m in msgs]
    text = str(msgs[0].message)
    assert "selective_scan2d" in text and "1x2x3x4" in text and "OutOfResources" in text


def test_selective_scan_1d_fallback_keeps_last_state(monkeypatch):
    from metaformer_zoo.kernels.selective_scan2d import triton as tk
    g = torch.Generator().manual_seed(1)
    u, delta = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g) * 0.5
    A, Bm, Cm = -(torch.rand(4, 3, generator=g) + 0.1), torch.randn(2, 2, 3, 9, generator=g), torch.randn(2, 2, 3, 9,
                                                                                                        generator=g)
    want, want_h = reference.selective_scan(u, delta, A, Bm, Cm, return_last_state=True)
    monkeypatch.setattr(tk, "scan_fwd", _raise)
    with pytest.warns(RuntimeWarning, match="selective_scan2d"):
        got, got_h = ss.selective_scan(u, delta, A, Bm, Cm, return_last_state=True, backend="triton")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, want_h)


def test_fft_filter_failing_kernel_falls_back_once(monkeypatch):
    from metaformer_zoo.kernels.fft_filter import fft_filter
    from metaformer_zoo.kernels.fft_filter import triton as ftk
    g = torch.Generator().manual_seed(0)
    G, bs, hid = 8, 2, 2
    x = torch.randn(1, G * bs, 4, 5, generator=g)
    ws = [torch.randn(2, G, bs, hid, generator=g) * 0.3, torch.randn(2, G, hid, generator=g) * 0.1,
          torch.randn(2, G, hid, bs, generator=g) * 0.3, torch.randn(2, G, bs, generator=g) * 0.1]
    args = dict(x=x, w1=ws[0], b1=ws[1], w2=ws[2], b2=ws[3])
    want, want_g = _fwd_bwd(lambda **a: fft_filter(**a, num_groups=G, backend="reference"), args)
    monkeypatch.setattr(ftk, "fft_filter_fwd", _raise)
    monkeypatch.setattr(ftk, "fft_filter_bwd", _raise)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            got, got_g = _fwd_bwd(lambda **a: fft_filter(**a, num_groups=G, backend="triton"), args)
            torch.testing.assert_close(got, want)
            for p, q in zip(got_g, want_g):
                torch.testing.assert_close(p, q)
    msgs = _fallback_warnings(rec)
    assert len(msgs) == 1 and "fft_filter" in str(msgs[0].message) and "1x16x4x5" in str(msgs[0].message)


def test_strip_mix_failing_kernel_falls_back_once(monkeypatch):
    from metaformer_zoo.kernels.strip_mix import strip_mix
    from metaformer_zoo.kernels.strip_mix import triton as stk
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(1, 4, 5, 6, generator=g), weight=torch.randn(1, 5, 5, 1, generator=g),
                bias=torch.randn(1, 5, generator=g))
    want, want_g = _fwd_bwd(lambda **a: strip_mix(**a, axis="h", raft_size=1, backend="reference"), args)
    monkeypatch.setattr(stk, "strip_mix_fwd_triton", _raise)
    monkeypatch.setattr(stk, "strip_mix_bwd_triton", _raise)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            got, got_g = _fwd_bwd(lambda **a: strip_mix(**a, axis="h", raft_size=1, backend="triton"), args)
            torch.testing.assert_close(got, want)
            for p, q in zip(got_g, want_g):
                torch.testing.assert_close(p, q)
    msgs = _fallback_warnings(rec)
    assert len(msgs) == 1 and "strip_mix" in str(msgs[0].message)


def test_device_oom_is_not_swallowed(monkeypatch):
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        K.run_kernel("strip_mix", "k", oom, lambda: 0)


# ----------------------------------------------------------------------------------------------------------------------
# optional mamba-ssm backend (fake module: the real one needs CUDA)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_mamba(monkeypatch):
    calls = []

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        calls.append(dict(u=tuple(u.shape), B=tuple(B.shape), C=tuple(C.shape), A_dtype=A.dtype))
        return reference.selective_scan_ref_naive(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                  return_last_state)

    mods = {n: types.ModuleType(n) for n in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface")}
    mods["mamba_ssm.ops.selective_scan_interface"].selective_scan_fn = selective_scan_fn
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    monkeypatch.setattr(ss, "MAMBA_NEEDS_CUDA", False)
    return calls


def test_mamba_ssm_backend_selective_scan2d(fake_mamba):
    a = _scan2d_args(3)
    got = ss.selective_scan2d(**a, backend="mamba_ssm")
    want = ss.selective_scan2d(**a, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # one call over the 4C route channels with B / C grouped per route
    assert fake_mamba == [dict(u=(1, 8, 12), B=(1, 4, 4, 12), C=(1, 4, 4, 12), A_dtype=torch.float32)]
    assert ss.mamba_ssm_available()


def test_mamba_ssm_backend_1d_mixed_groups(fake_mamba):
    g = torch.Generator().manual_seed(2)
    u, delta = torch.randn(1, 6, 7, generator=g), torch.randn(1, 6, 7, generator=g) * 0.5
    A = -(torch.rand(6, 2, generator=g) + 0.1)
    Bm, Cm = torch.randn(1, 2, 7, generator=g), torch.randn(1, 3, 2, 7, generator=g)  # shared B, 3 groups of C
    got = ss.selective_scan(u, delta, A, Bm, Cm, delta_softplus=True, backend="mamba_ssm")
    torch.testing.assert_close(got, ss.selective_scan(u, delta, A, Bm, Cm, delta_softplus=True,
                                                      backend="reference"), rtol=1e-5, atol=1e-5)
    assert fake_mamba[0]["B"] == fake_mamba[0]["C"] == (1, 3, 2, 7)  # one common group count


def test_vim2_mixer_selects_mamba_ssm_through_the_environment(fake_mamba, monkeypatch):
    from metaformer_zoo.mixers.vim2 import SS2D
    torch.manual_seed(0)
    m = SS2D(8).eval()
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        want = m(x)
        monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "mamba_ssm")
        got = m(x)
    assert len(fake_mamba) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mamba_ssm_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # "not installed"
    assert not ss.mamba_ssm_available()
    with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
        ss.selective_scan2d(**_scan2d_args(), backend="mamba_ssm")


# ----------------------------------------------------------------------------------------------------------------------
# the GPU proof tools (CPU side: syntax, clean exit without a GPU, the table layout)
# ----------------------------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_script_without_gpu():
    import subprocess
    script = os.path.join(ROOT, "tools", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tools/gpu_check.sh would run the real check")
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr


def test_benchmark_table_columns():
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark_kernels", os.path.join(ROOT, "tools", "benchmark_kernels.py"))
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    case = dict(bytes=4e9, bytes_fwd_bwd=1e10, exps=1e9, exps_fwd_bwd=2e9)
    row = dict(op="selective_scan2d", case="stage1", err=1e-7, eager=(10.0, 40.0), compiled=None, triton=(1.0, 3.0),
               mamba_ssm=(0.5, 2.5))
    row = bk._finish_row(row, case, copy_bw=2e12, exp_rate=1e12)
    table = bk.format_op_table([row, dict(op="fft_filter", case="x", error="OOM: y")], 2e12, 1e12, "GPU")
    header = table.splitlines()[4]
    for col in ("eager f+b", "compiled f+b", "triton f+b", "mamba-ssm fwd", "mamba-ssm f+b", "roofline fwd",
                "roofline f+b"):
        assert col in header, col
    line = table.splitlines()[6]
    assert "| 0.500 | 2.500 | 2.000 |" in line  # mamba-ssm fwd / f+b, roofline fwd = max(4e9 / 2e12, 1e9 / 1e12) s
    assert bk.parse_args(["--ops", "selective_scan2d", "--batch", "8"]).batch == 8

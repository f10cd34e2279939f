"""Benchmark cases for ``tools/benchmark_kernels.py``: the ViM2-T shapes of ``selective_scan2d`` and ``selective_scan``.

``benchmark_cases(device, dtype, batch, smoke)`` returns a list of dicts (the harness also accepts plain
``(name, reference_fn, triton_fn, bytes_moved)`` tuples):

* ``name``, ``reference`` / ``triton``: zero-argument callables returning the op's output (autograd-connected to
  ``inputs``);
* ``bytes`` / ``bytes_fwd_bwd``: the fewest bytes the forward / forward+backward must move (each input read once,
  each output written once; for fwd+bwd also the upstream gradient read and every input gradient written; the saved
  chunk states are not counted);
* ``exps`` / ``exps_fwd_bwd``: the fewest exp2 evaluations (N per (b, route, channel, step) in the forward, and once
  more in the backward, which must recompute exp(delta * A) unless it stores (B, 4C, L, N));
* ``inputs``: the leaves whose ``.grad`` the harness resets between repetitions; ``compile``: whether timing
  ``torch.compile`` of the reference is sensible (the reference is a Python loop over L steps that Dynamo unrolls:
  only L <= 196 is compiled, to keep ``tools/gpu_check.sh`` within its time budget);
* ``mamba_ssm`` (only when mamba-ssm's CUDA kernel is importable): the same op through ``backend="mamba_ssm"``.

Shapes (ViM2-T = vanilla VMamba-T token mixer, d_inner = 2C, N = 16; channel mixer g = 16, bidirectional, so the 1D op
sees dim = 32 in 2 groups and L = 2C / 16 steps, batch = images * H * W tokens).

The harness times forward and forward+backward separately. Standalone quick look without the shared harness::

    python -m metaformer_zoo.kernels.selective_scan2d.bench [--batch 32] [--dtype bfloat16]
"""
from __future__ import annotations

import torch

# (stage, d_inner, H = W) of ViM2-T at 224 px
VIM2_T_STAGES = ((1, 192, 56), (2, 384, 28), (3, 768, 14), (4, 1536, 7))
D_STATE = 16


def _mamba(fn, device) -> dict:
    """``{"mamba_ssm": fn}`` when mamba-ssm's CUDA selective_scan_fn can run here (timed beside ours), else {}."""
    from . import mamba_ssm_available
    return {"mamba_ssm": fn} if str(device).startswith("cuda") and mamba_ssm_available() else {}


def _ss2d_case(stage, Ch, HW, N, batch, device, dtype):
    from . import selective_scan2d
    g = torch.Generator(device="cpu").manual_seed(stage)
    L = HW * HW

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(True)
    x = rnd(batch, Ch, HW, HW)
    delta = rnd(batch, 4, Ch, L, scale=0.5)
    A = (-torch.arange(1, N + 1, dtype=torch.float32).repeat(4 * Ch, 1)).to(device).requires_grad_(True)  # S4D-real
    B = rnd(batch, 4, N, L)
    C = rnd(batch, 4, N, L)
    D = rnd(4 * Ch, dt=torch.float32)
    bias = rnd(4 * Ch, scale=0.1, dt=torch.float32)
    inputs = [x, delta, A, B, C, D, bias]

    def ref():
        return selective_scan2d(x, delta, A, B, C, D, bias, True, backend="reference")

    def tri():
        return selective_scan2d(x, delta, A, B, C, D, bias, True, backend="triton")

    def mamba():
        return selective_scan2d(x, delta, A, B, C, D, bias, True, backend="mamba_ssm")
    s = x.element_size()
    per_px_fwd = (Ch + 4 * Ch + 2 * 4 * N + Ch) * s  # x, delta, B, C in; out
    per_px_bwd = (Ch + 4 * Ch + 2 * 4 * N + Ch) * s + (Ch + 4 * Ch + 2 * 4 * N) * s  # x, delta, B, C, g in; grads out
    elems = batch * 4 * Ch * L
    return dict(
        name=f"selective_scan2d vim2_t stage{stage} ({batch}x{Ch}x{HW}x{HW}, N={N})",
        reference=ref, triton=tri, inputs=inputs, **_mamba(mamba, device),
        bytes=batch * L * per_px_fwd, bytes_fwd_bwd=batch * L * (per_px_fwd + per_px_bwd),
        exps=elems * N, exps_fwd_bwd=2 * elems * N, compile=L <= 196,
    )


def _ss1d_case(stage, C, HW, N, batch, device, dtype, group_size=16):
    from . import selective_scan
    g = torch.Generator(device="cpu").manual_seed(100 + stage)
    M = batch * HW * HW
    S = 2 * C // group_size
    dim, G = 2 * group_size, 2

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt).requires_grad_(True)
    u = rnd(M, dim, S)
    delta = rnd(M, dim, S, scale=0.5)
    A = (-torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1)).to(device).requires_grad_(True)
    B = rnd(M, G, N, S)
    Cm = rnd(M, G, N, S)
    D = rnd(dim, dt=torch.float32)
    bias = rnd(dim, scale=0.1, dt=torch.float32)
    inputs = [u, delta, A, B, Cm, D, bias]

    def ref():
        return selective_scan(u, delta, A, B, Cm, D, None, bias, True, backend="reference")

    def tri():
        return selective_scan(u, delta, A, B, Cm, D, None, bias, True, backend="triton")

    def mamba():
        return selective_scan(u, delta, A, B, Cm, D, None, bias, True, backend="mamba_ssm")
    s = u.element_size()
    per_tok_fwd = (dim * S * 3 + 2 * G * N * S) * s  # u, delta in, out; B, C in
    per_tok_bwd = per_tok_fwd + (dim * S * 2 + 2 * G * N * S) * s
    elems = M * dim * S
    return dict(
        name=f"selective_scan channel-mixer vim2_t stage{stage} ({M}x{dim}x{S}, G={G}, N={N})",
        reference=ref, triton=tri, inputs=inputs, **_mamba(mamba, device),
        bytes=M * per_tok_fwd, bytes_fwd_bwd=M * (per_tok_fwd + per_tok_bwd),
        exps=elems * N, exps_fwd_bwd=2 * elems * N, compile=S <= 256 and M <= 65536,
    )


def benchmark_cases(device="cuda", dtype=torch.bfloat16, batch=64, smoke=False):
    if smoke:  # tiny shapes for a CPU / interpreter run of the harness itself
        return [_ss2d_case(1, 4, 4, 4, 1, device, dtype), _ss1d_case(1, 16, 2, 4, 1, device, dtype)]
    cases = [_ss2d_case(st, ch, hw, D_STATE, batch, device, dtype) for st, ch, hw in VIM2_T_STAGES]
    cases += [_ss1d_case(st, ch // 2, hw, D_STATE, batch, device, dtype) for st, ch, hw in VIM2_T_STAGES]
    return cases


def main(argv=None):
    """Forward / forward+backward medians of the reference and Triton paths (CUDA events; no torch.compile column,
    no roofline: use ``tools/benchmark_kernels.py`` for the full table)."""
    import argparse

    import triton.testing
    p = argparse.ArgumentParser(description="selective_scan2d benchmark cases, standalone")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench: needs a CUDA device (tools/benchmark_kernels.py --allow-cpu runs a CPU smoke test)")
        return 0
    print(f"{'case':70s} {'ref fwd':>9s} {'tri fwd':>9s} {'ref f+b':>9s} {'tri f+b':>9s}  (ms)")
    for c in benchmark_cases("cuda", getattr(torch, a.dtype), a.batch):
        res = []
        for fn in (c["reference"], c["triton"]):
            out = fn()
            g = torch.randn_like(out)
            t_f = triton.testing.do_bench(fn, return_mode="median")
            t_fb = triton.testing.do_bench(lambda: out.__class__.backward(fn(), g), grad_to_none=c["inputs"],
                                           return_mode="median")
            res.append((t_f, t_fb))
        print(f"{c['name']:70s} {res[0][0]:9.3f} {res[1][0]:9.3f} {res[0][1]:9.3f} {res[1][1]:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark cases for the 2D selective scan at ViM2 stage shapes (for the shared GPU benchmark).

``benchmark_cases(device, batch, dtype)`` returns ``(name, reference_fn, triton_fn_or_None, bytes_moved)`` tuples:
zero-argument callables running one forward pass on inputs prepared once, and the minimum bytes the op must move
(read each input once, write the output once, float32 accumulation / output), so that achieved bandwidth is
``bytes_moved / time``. ``triton_fn`` is None when no Triton backend can run (no CUDA device, or no triton.py yet).

Shapes (ViM2-T / ViM2-S, 224 px): SS2D in stage i has d_inner = 2 C_i on an H_i x W_i map, N = 16, 4 routes;
the selective channel mixer scans batch*H_i*W_i rows of 2 x 16 channels over 2 C_i / 16 steps.

    python -m metaformer_zoo.kernels.selective_scan2d.bench [--device cuda] [--batch 32] [--backward]
"""
import argparse
import time
from typing import Callable, List, Optional, Tuple

import torch

from . import reference

DIMS = (96, 192, 384, 768)  # ViM2-T / S stage widths
SIZES = (56, 28, 14, 7)  # 224 px input
D_STATE = 16
GROUP = 16


def _triton_available(device: str) -> bool:
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        from . import triton as _triton  # noqa: F401  (written by the kernel helper)
    except Exception:
        return False
    return True


def _ss2d_inputs(batch, d, H, W, device, dtype):
    L = H * W
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa
    x = r(batch, d, H, W)
    delta = r(batch, 4, d, L) * 0.5 - 2
    A = -torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(4 * d, 1).to(device)
    Bm, Cm = r(batch, 4, D_STATE, L), r(batch, 4, D_STATE, L)
    D = torch.ones(4 * d, device=device)
    bias = torch.full((4 * d,), -3.0, device=device)
    return x, delta, A, Bm, Cm, D, bias


def benchmark_cases(device: str = "cuda", batch: int = 32, dtype: torch.dtype = torch.float32,
                    backward: bool = False) -> List[Tuple[str, Callable, Optional[Callable], int]]:
    from . import selective_scan, selective_scan2d
    use_triton = _triton_available(device)
    es = torch.tensor([], dtype=dtype).element_size()
    cases = []
    for i, (C, S) in enumerate(zip(DIMS, SIZES)):
        d = 2 * C
        args = _ss2d_inputs(batch, d, S, S, device, dtype)
        if backward:
            args = tuple(a.requires_grad_() if a.is_floating_point() else a for a in args)
        L = S * S
        nbytes = (batch * d * L * es  # x
                  + batch * 4 * d * L * es  # delta
                  + 2 * batch * 4 * D_STATE * L * es  # B, C
                  + batch * d * L * 4  # out (float32)
                  + 4 * d * (D_STATE + 2) * 4)  # A, D, bias

        def run(backend, a=args):
            out = (reference.selective_scan2d(*a) if backend == "reference"
                   else selective_scan2d(*a, delta_softplus=True, backend=backend))
            if backward:
                out.sum().backward()
            return out

        cases.append((f"ss2d_stage{i + 1}_b{batch}_d{d}_{S}x{S}", lambda r=run: r("reference"),
                      (lambda r=run: r("triton")) if use_triton else None, nbytes))
        # selective channel mixer: rows = tokens, 2 directions x g channels, 2C/g steps, B/C grouped per direction
        M, K, steps = batch * L, 2, d // GROUP
        g = torch.Generator(device="cpu").manual_seed(1)
        r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa
        u, dl = r(M, K * GROUP, steps), r(M, K * GROUP, steps) * 0.5 - 2
        if backward:
            u.requires_grad_()
            dl.requires_grad_()
        A = -torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(K * GROUP, 1).to(device)
        Bm, Cm = r(M, K, D_STATE, steps), r(M, K, D_STATE, steps)
        cargs = (u, dl, A, Bm, Cm, torch.ones(K * GROUP, device=device), None, torch.full((K * GROUP,), -3.0, device=device))
        nbytes_c = 2 * M * K * GROUP * steps * es + 2 * M * K * D_STATE * steps * es + M * K * GROUP * steps * 4

        def run_c(backend, a=cargs):
            if backend == "reference":
                out = reference.selective_scan(*a, delta_softplus=True)
            else:
                out = selective_scan(*a, delta_softplus=True, backend=backend)
            if backward:
                out.sum().backward()
            return out

        cases.append((f"channel_stage{i + 1}_rows{M}_d{K * GROUP}_L{steps}", lambda r=run_c: r("reference"),
                      (lambda r=run_c: r("triton")) if use_triton else None, nbytes_c))
    return cases


def _time(fn: Callable, device: str, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backward", action="store_true")
    a = p.parse_args()
    print(f"{'case':44s} {'ref ms':>10s} {'triton ms':>10s} {'ref GB/s':>9s} {'tri GB/s':>9s}")
    for name, ref_fn, tri_fn, nbytes in benchmark_cases(a.device, a.batch, backward=a.backward):
        tr = _time(ref_fn, a.device, a.reps)
        tt = _time(tri_fn, a.device, a.reps) if tri_fn is not None else float("nan")
        print(f"{name:44s} {tr * 1e3:10.2f} {tt * 1e3:10.2f} {nbytes / tr / 1e9:9.2f} {nbytes / tt / 1e9:9.2f}")


if __name__ == "__main__":
    main()

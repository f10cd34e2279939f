"""Benchmark cases of ``strip_mix`` for ``tools/benchmark_kernels.py``, plus a CPU per-mixer baseline.

``benchmark_cases(device, dtype, batch, smoke)`` returns dicts (``name``, ``reference``, ``triton``, ``bytes``,
``bytes_fwd_bwd``, ``inputs``, ``compile``) at the stage shapes of the two users at 224 px:

* RaftMLP-S token MLP (``fc1``: raft 2 -> 4, vertical, and at stage 1 also horizontal; ``fc2``: raft 4 -> 2):
  C = 64/128/256/512 on 56/28/14/7 maps;
* Strip-MLP-T CGSMM strips (``proj_h``: axis "w", window 3; G = 20/40/80/160 groups over C/2 = 40/80/160/320
  channels on 56/28/14/7 maps).

``bytes``: the fewest bytes the forward must move (x read, weight + bias read, output written once);
``bytes_fwd_bwd`` adds the backward's (grad_out read twice: for dx and dweight; x read again; dx, dweight written).
The reference is the eager permute/window + einsum path (``reference.py``).

``python -m metaformer_zoo.kernels.strip_mix.bench --cpu-baseline`` (or ``cpu_mixer_baseline()``) times each
registered mixer of the two families (reference path, eval, no grad) at each stage shape with batch 8 on the CPU:
the numbers quoted in model_cards/raftmlp.md and model_cards/stripmlp.md.
"""
from __future__ import annotations

import torch

from .. import measure_ms

RAFT_S_STAGES = ((1, 64, 56), (2, 128, 28), (3, 256, 14), (4, 512, 7))
STRIP_T_STAGES = ((1, 80, 56), (2, 160, 28), (3, 320, 14), (4, 640, 7))


def _case(name, B, C, H, W, G, Fo, Fi, K, axis, raft, device, dtype, seed):
    from . import strip_mix
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)
    x = rnd(B, C, H, W)
    w = rnd(G, Fo, Fi, K, scale=(Fi * K) ** -0.5)
    b = rnd(G, Fo, scale=0.1)
    L = H if axis == "h" else W
    out_numel = B * (Fo // L) * (C // raft) * H * W
    s = x.element_size()
    fwd = (x.numel() + w.numel() + b.numel() + out_numel) * s
    bwd = (2 * out_numel + x.numel() + x.numel() + w.numel() + b.numel()) * s
    return dict(
        name=name,
        reference=lambda: strip_mix(x, w, b, axis, raft, backend="reference"),
        triton=lambda: strip_mix(x, w, b, axis, raft, backend="triton"),
        inputs=[x, w, b], bytes=fwd, bytes_fwd_bwd=fwd + bwd, compile=True,
    )


def benchmark_cases(device="cuda", dtype=torch.bfloat16, batch=64, smoke=False):
    cases = []
    raft, e = 2, 2
    raft_stages = RAFT_S_STAGES if not smoke else ((1, 8, 6),)
    strip_stages = STRIP_T_STAGES if not smoke else ((1, 8, 5),)
    B = batch if not smoke else 1
    for st, C, HW in raft_stages:
        n = raft * HW
        cases.append(_case(f"strip_mix raftmlp_s stage{st} fc1 vertical ({B}x{C}x{HW}x{HW}, r=2->4)",
                           B, C, HW, HW, 1, e * n, n, 1, "h", raft, device, dtype, st))
        if st == 1:
            cases.append(_case(f"strip_mix raftmlp_s stage{st} fc1 horizontal ({B}x{C}x{HW}x{HW}, r=2->4)",
                               B, C, HW, HW, 1, e * n, n, 1, "w", raft, device, dtype, 10 + st))
        cases.append(_case(f"strip_mix raftmlp_s stage{st} fc2 vertical ({B}x{2 * C}x{HW}x{HW}, r=4->2)",
                           B, e * C, HW, HW, 1, n, e * n, 1, "h", e * raft, device, dtype, 20 + st))
    from metaformer_zoo.mixers.strip import strip_groups
    for st, C, HW in strip_stages:
        G = strip_groups(C) if not smoke else 2
        cases.append(_case(f"strip_mix stripmlp_t stage{st} proj_h ({B}x{C // 2}x{HW}x{HW}, G={G}, K=3)",
                           B, C // 2, HW, HW, G, HW, HW, 3, "w", 1, device, dtype, 30 + st))
    return cases


def cpu_mixer_baseline(batch: int = 8, min_run_time: float = 0.5, threads: int = None):
    """CPU time (ms, median per call over ``min_run_time`` s, ``measure_ms``) of each RaftMLP / Strip-MLP mixer on
    the reference path, per stage shape."""
    import os
    os.environ.setdefault("METAFORMER_ZOO_KERNELS", "reference")
    import metaformer_zoo  # noqa: F401
    from metaformer_zoo.mixers import create_mixer
    from metaformer_zoo.mixers.raft import RaftTokenMixing
    if threads:
        torch.set_num_threads(threads)
    rows = []
    with torch.no_grad():
        for st, C, HW in RAFT_S_STAGES:
            m = RaftTokenMixing(C, (HW, HW), 2, 2).eval()
            x = torch.randn(batch, C, HW, HW)
            ms = measure_ms(lambda: m(x), min_run_time=min_run_time)
            rows.append(("raft (vertical+horizontal, RaftMLP-S)", st, (batch, C, HW, HW), ms))
        for st, C, HW in STRIP_T_STAGES:
            x = torch.randn(batch, C, HW, HW)
            xh = torch.randn(batch, C // 2, HW, HW)
            for name, dim, inp in (("strip (full TokenMixing)", C, x), ("cgsmm", C // 2, xh), ("lsmm", C // 2, xh)):
                kw = {"feat_size": (HW, HW)} if name != "lsmm" else {}
                m = create_mixer(name.split()[0], dim, **kw).eval()
                ms = measure_ms(lambda: m(inp), min_run_time=min_run_time)
                rows.append((f"{name} (Strip-MLP-T)", st, tuple(inp.shape), ms))
    return rows


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--cpu-baseline", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timed calls per shape")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.cpu_baseline:
        print(f"torch threads: {a.threads or torch.get_num_threads()}")
        print("| mixer | stage | input (B, C, H, W) | CPU ms (median) |\n|---|---|---|---|")
        for name, st, shape, ms in cpu_mixer_baseline(a.batch, a.min_run_time, a.threads):
            print(f"| {name} | {st} | {shape} | {ms:.1f} |")

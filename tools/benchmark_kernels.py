#!/usr/bin/env python
"""GPU benchmark of the zoo's Triton kernels against their PyTorch references (Markdown table out).

Per op and per model-stage shape it prints the median forward and forward+backward time of

* the plain-PyTorch reference, eager;
* ``torch.compile`` of the reference (skipped where a case says compiling is impractical, or with ``--no-compile``);
* the Triton kernels (``backend="triton"``);
* mamba-ssm's CUDA ``selective_scan_fn`` (``backend="mamba_ssm"``) for the selective-scan cases, when mamba-ssm is
  installed (a case's optional ``mamba_ssm`` callable);

plus the Triton speed-up over eager, the achieved bandwidth (bytes the op must move / time) against the measured
device-to-device copy bandwidth, and the fraction of the roofline bound reached. The roofline time of a case is
``max(bytes / copy_bandwidth, exps / exp2_rate)`` where both rates are measured on the device first (a large D2D copy
counting bytes read + written, and an exp2 throughput microkernel); cases say how many bytes and exp2 they need at
least (see each op's ``bench.py``).

Cases come from each op package's optional ``bench.py``: ``metaformer_zoo.kernels.<op>.bench.benchmark_cases()``
returning a list of ``(name, reference_fn, triton_fn, bytes_moved)`` tuples or of dicts with the keys ``name``,
``reference``, ``triton``, ``bytes`` and optionally ``bytes_fwd_bwd``, ``exps``, ``exps_fwd_bwd``, ``inputs`` (leaves
whose grads are reset between repetitions), ``compile`` (bool). Every ``benchmark_cases`` takes the keyword arguments
``device``, ``dtype``, ``batch`` and ``smoke`` (tiny shapes for a CPU / interpreter run of the harness). The functions take no
argument and return the op output; the forward+backward time backpropagates a fixed random gradient through it.

Targets (checked in the ``target`` column):

* ``selective_scan2d``: forward+backward >= 10x the eager reference and >= 50 % of its roofline bound;
* ``fft_filter``: >= 3x the eager torch.fft path (forward+backward);
* ``strip_mix``: >= 2x the eager permute + matmul path (forward+backward).

``--e2e``: end-to-end training-step time (AdamW, bf16 autocast, channels-last, random data) of ``affnet``,
``raftmlp_s`` and ``vim2_tiny`` with the kernels on (``METAFORMER_ZOO_KERNELS=triton``) and off (``=reference``);
models that are not registered are skipped.

Runs on CUDA only: on a machine without a GPU it prints a message and exits 0, unless ``--allow-cpu`` is given, which
runs tiny "smoke" shapes with the Triton interpreter (``TRITON_INTERPRET=1``) to exercise the harness itself (times
meaningless).

Usage::

    python tools/benchmark_kernels.py                       # every op, bf16, batch 64
    python tools/benchmark_kernels.py --ops selective_scan2d --batch 128 --out bench.md
    python tools/benchmark_kernels.py --e2e --batch 64 --out e2e.md
    python tools/benchmark_kernels.py --allow-cpu           # CPU smoke run of the harness
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

TARGETS = {  # op -> (min fwd+bwd speed-up over eager reference, min fraction of roofline or None)
    "selective_scan2d": (10.0, 0.5),
    "fft_filter": (3.0, None),
    "strip_mix": (2.0, None),
}
E2E_MODELS = ("affnet", "raftmlp_s", "vim2_tiny")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="*", default=None, help="op packages to benchmark (default: all with a bench.py)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--warmup", type=float, default=25, help="warm-up time per measurement, ms (do_bench)")
    p.add_argument("--rep", type=float, default=200, help="repetition time per measurement, ms (do_bench)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    p.add_argument("--e2e", action="store_true", help="end-to-end training-step time with kernels on vs off")
    p.add_argument("--models", nargs="*", default=list(E2E_MODELS), help="models for --e2e")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per model and mode (--e2e)")
    p.add_argument("--allow-cpu", action="store_true", help="CPU smoke run: tiny shapes, Triton interpreter")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# timing and device ceilings
# ----------------------------------------------------------------------------------------------------------------------
def bench_ms(fn, cuda: bool, warmup: float, rep: float, grad_to_none=None) -> float:
    """Median time of fn in ms: ``metaformer_zoo.kernels.measure_ms`` (triton's do_bench over ``rep`` ms on CUDA;
    torch.utils.benchmark in CPU smoke mode, over a short run). ``warmup``: untimed calls on CUDA (ms of do_bench's
    own warm-up is its default)."""
    from metaformer_zoo.kernels import measure_ms
    return measure_ms(fn, "cuda" if cuda else "cpu", warmup=max(1, int(warmup > 0)),
                      min_run_time=rep / 1e3 if cuda else 0.05, grad_to_none=grad_to_none)


def measure_copy_bandwidth(torch, device, cuda: bool, warmup, rep) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written."""
    n = (1 << 28) if cuda else (1 << 22)  # 1 GiB of fp32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), cuda, warmup, rep)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3)


def measure_exp2_rate(device, cuda: bool):
    """exp2 evaluations per second on the device (Triton microkernel, 8 independent chains per element)."""
    if not cuda:
        return None
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _exp2_kernel(x_ptr, o_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        a0 = x
        a1 = x + 0.1
        a2 = x + 0.2
        a3 = x + 0.3
        a4 = x + 0.4
        a5 = x + 0.5
        a6 = x + 0.6
        a7 = x + 0.7
        for _ in range(ITERS):  # exp2 of values in (-1, 0): stays bounded, never constant-folds
            a0 = tl.exp2(a0) - 1.5
            a1 = tl.exp2(a1) - 1.5
            a2 = tl.exp2(a2) - 1.5
            a3 = tl.exp2(a3) - 1.5
            a4 = tl.exp2(a4) - 1.5
            a5 = tl.exp2(a5) - 1.5
            a6 = tl.exp2(a6) - 1.5
            a7 = tl.exp2(a7) - 1.5
        tl.store(o_ptr + offs, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7)

    try:
        block, iters = 1024, 256
        n = block * 132 * 64
        x = -torch.rand(n, device=device)
        o = torch.empty_like(x)
        fn = lambda: _exp2_kernel[(n // block,)](x, o, ITERS=iters, BLOCK=block, num_warps=8)  # noqa: E731
        ms = bench_ms(fn, cuda, 25, 100)
        return n * iters * 8 / (ms * 1e-3)
    except Exception as e:  # the table still has the bandwidth bound
        print(f"[benchmark_kernels] exp2 microbenchmark failed ({type(e).__name__}: {e}); roofline uses bytes only")
        return None


# ----------------------------------------------------------------------------------------------------------------------
# op cases
# ----------------------------------------------------------------------------------------------------------------------
def discover_ops():
    import metaformer_zoo.kernels as K
    return sorted(m.name for m in pkgutil.iter_modules(K.__path__) if m.ispkg)


def collect_cases(op, **kw):
    try:
        mod = importlib.import_module(f"metaformer_zoo.kernels.{op}.bench")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"{op}.bench"):
            return None
        raise
    cases = []
    for c in mod.benchmark_cases(**kw):  # the protocol: benchmark_cases(device, dtype, batch, smoke)
        if not isinstance(c, dict):
            name, ref, tri, nbytes = c
            c = dict(name=name, reference=ref, triton=tri, bytes=nbytes)
        c.setdefault("compile", True)
        cases.append(c)
    return cases


def _first_tensor(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def _rel_err(a, b):
    a, b = _first_tensor(a).detach().double(), _first_tensor(b).detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def time_impl(fn, case, cuda, args):
    """(fwd ms, fwd+bwd ms or None) for one implementation of a case."""
    import torch
    out = _first_tensor(fn())
    t_f = bench_ms(lambda: fn(), cuda, args.warmup, args.rep)
    t_fb = None
    if out is not None and out.requires_grad:
        g = torch.randn_like(out)
        leaves = case.get("inputs")

        def fb():
            o = _first_tensor(fn())
            torch.autograd.backward(o, g)
        t_fb = bench_ms(fb, cuda, args.warmup, args.rep, grad_to_none=leaves)
        if leaves:
            for t in leaves:
                t.grad = None
    return t_f, t_fb


def run_op_cases(torch, args, cuda, device, dtype, copy_bw, exp_rate):
    ops = args.ops or discover_ops()
    rows = []
    for op in ops:
        cases = collect_cases(op, device=device, dtype=dtype, batch=args.batch, smoke=not cuda)
        if cases is None:
            print(f"[benchmark_kernels] {op}: no bench.py, skipped")
            continue
        for case in cases:
            name = case["name"]
            print(f"[benchmark_kernels] {name} ...", flush=True)
            row = dict(op=op, case=name)
            try:
                row["err"] = _rel_err(case["triton"](), case["reference"]())
                row["eager"] = time_impl(case["reference"], case, cuda, args)
                if args.no_compile or not case.get("compile", True):
                    row["compiled"] = None
                else:
                    try:
                        # CPU smoke run: aot_eager exercises the path without a C++ toolchain
                        compiled = torch.compile(case["reference"], **({} if cuda else {"backend": "aot_eager"}))
                        row["compiled"] = time_impl(compiled, case, cuda, args)
                    except Exception as e:  # compile failures are reported, not fatal
                        print(f"[benchmark_kernels]   torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
                        row["compiled"] = "fail"
                row["triton"] = time_impl(case["triton"], case, cuda, args)
                row["mamba_ssm"] = None
                if case.get("mamba_ssm") is not None:
                    try:
                        row["mamba_ssm"] = time_impl(case["mamba_ssm"], case, cuda, args)
                    except Exception as e:  # an optional column: report, never fatal
                        print(f"[benchmark_kernels]   mamba-ssm failed: {type(e).__name__}: {str(e)[:200]}")
                        row["mamba_ssm"] = "fail"
            except (torch.cuda.OutOfMemoryError, MemoryError) as e:
                row["error"] = f"OOM: {str(e)[:80]}"
            except Exception as e:  # one broken case must not lose the whole table
                row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(_finish_row(row, case, copy_bw, exp_rate))
            if cuda:
                torch.cuda.empty_cache()
    return rows


def _roofline_ms(nbytes, nexps, copy_bw, exp_rate):
    if not nbytes:
        return None
    t = nbytes / copy_bw
    if nexps and exp_rate:
        t = max(t, nexps / exp_rate)
    return t * 1e3


def _finish_row(row, case, copy_bw, exp_rate):
    if "error" in row:
        return row
    tf, tfb = row["triton"]
    ef, efb = row["eager"]
    row["speedup_fwd"] = ef / tf
    row["speedup_fb"] = efb / tfb if (efb and tfb) else None
    row["bw_fwd"] = case["bytes"] / (tf * 1e-3) if case.get("bytes") else None
    row["bw_fb"] = case["bytes_fwd_bwd"] / (tfb * 1e-3) if (case.get("bytes_fwd_bwd") and tfb) else None
    row["roof_fwd"] = _roofline_ms(case.get("bytes"), case.get("exps"), copy_bw, exp_rate)
    row["roof_fb"] = _roofline_ms(case.get("bytes_fwd_bwd"), case.get("exps_fwd_bwd"), copy_bw, exp_rate)
    row["eff_fb"] = row["roof_fb"] / tfb if (row["roof_fb"] and tfb) else None
    row["eff_fwd"] = row["roof_fwd"] / tf if row["roof_fwd"] else None
    tgt = TARGETS.get(row["op"])
    if tgt is None or row["speedup_fb"] is None:
        row["target"] = "-"
    else:
        ok = row["speedup_fb"] >= tgt[0]
        desc = f">={tgt[0]:g}x"
        if tgt[1] is not None:
            ok = ok and row["eff_fb"] is not None and row["eff_fb"] >= tgt[1]
            desc += f", >={tgt[1]:.0%} roofline"
        row["target"] = ("PASS " if ok else "MISS ") + desc
    return row


def _ms(v):
    if v is None:
        return "-"
    if v == "fail":
        return "fail"
    return f"{v:.3f}"


def _pair(v, i):
    if v is None or v == "fail":
        return _ms(v)
    return _ms(v[i])


def format_op_table(rows, copy_bw, exp_rate, device_name):
    head = (f"Device: {device_name}; measured D2D copy bandwidth {copy_bw / 1e9:.0f} GB/s"
            + (f"; exp2 rate {exp_rate / 1e12:.2f} T/s" if exp_rate else "") + "\n\n")
    cols = ["op", "case", "eager fwd", "eager f+b", "compiled fwd", "compiled f+b", "triton fwd", "triton f+b",
            "mamba-ssm fwd", "mamba-ssm f+b", "roofline fwd", "speed-up fwd", "speed-up f+b", "GB/s fwd", "GB/s f+b", "roofline f+b", "% roofline f+b", "rel err",
            "target"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['case']} | " + " | ".join(["-"] * (len(cols) - 3)) + f" | {r['error']} |")
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append("| " + " | ".join([
            r["op"], r["case"], _pair(r["eager"], 0), _pair(r["eager"], 1), _pair(r["compiled"], 0),
            _pair(r["compiled"], 1), _pair(r["triton"], 0), _pair(r["triton"], 1), _pair(r.get("mamba_ssm"), 0),
            _pair(r.get("mamba_ssm"), 1), _ms(r["roof_fwd"]), f(r["speedup_fwd"], ".1f"),
            f(r["speedup_fb"], ".1f"), f(r["bw_fwd"] and r["bw_fwd"] / 1e9, ".0f"),
            f(r["bw_fb"] and r["bw_fb"] / 1e9, ".0f"), _ms(r["roof_fb"]),
            f(r["eff_fb"] and 100 * r["eff_fb"], ".0f"), f(r["err"], ".1e"), r["target"]]) + " |")
    return head + ("Times are medians in ms; roofline = max(bytes / copy bandwidth, exp2 / exp2 rate); '-' = not run "
                   "(mamba-ssm not installed, or compiling skipped).\n\n") + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# end-to-end training step
# ----------------------------------------------------------------------------------------------------------------------
def run_e2e(torch, args, cuda, device):
    import timm
    import torch.nn.functional as F

    import metaformer_zoo  # noqa: F401  (registers the zoo models)
    registered = set(timm.list_models())
    modes = ("reference", "triton") if cuda else ("reference",)
    rows = []
    for name in args.models:
        if name not in registered:
            print(f"[benchmark_kernels] e2e: {name} is not registered, skipped")
            rows.append(dict(model=name, note="not registered"))
            continue
        row = dict(model=name)
        for mode in modes:
            os.environ["METAFORMER_ZOO_KERNELS"] = mode
            try:
                model = timm.create_model(name, num_classes=1000)
                size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:] if cuda else (64, 64)
                batch = args.batch if cuda else 2
                model = model.to(device).to(memory_format=torch.channels_last).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                x = torch.randn(batch, 3, *size, device=device).to(memory_format=torch.channels_last)
                y = torch.randint(0, 1000, (batch,), device=device)
                amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cuda)

                def step():
                    with amp:
                        loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                # CUDA: do_bench over about args.steps steps (device events); CPU smoke: a short blocked_autorange
                step()
                step_ms = bench_ms(step, cuda, 3, 0)
                t = bench_ms(step, cuda, 3, step_ms * args.steps) / 1e3 if cuda else step_ms / 1e3
                row[mode] = (t * 1e3, batch / t)
                row["shape"] = f"{batch}x3x{size[0]}x{size[1]}"
            except Exception as e:
                row[mode] = f"{type(e).__name__}: {str(e)[:60]}"
            finally:
                os.environ.pop("METAFORMER_ZOO_KERNELS", None)
                if cuda:
                    torch.cuda.empty_cache()
        rows.append(row)
    return rows


def format_e2e_table(rows, device_name):
    cols = ["model", "input", "kernels off: ms/step", "off: img/s", "kernels on: ms/step", "on: img/s", "speed-up"]
    lines = [f"Device: {device_name}; training step = fwd + bwd + AdamW, bf16 autocast, channels-last, "
             "median over steps.\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['model']} | {r['note']} |" + " - |" * (len(cols) - 2))
            continue
        cells = [r["model"], r.get("shape", "-")]
        for mode in ("reference", "triton"):
            v = r.get(mode)
            if isinstance(v, tuple):
                cells += [f"{v[0]:.1f}", f"{v[1]:.0f}"]
            else:
                cells += [v or "-", "-"]
        off, on = r.get("reference"), r.get("triton")
        cells.append(f"{off[0] / on[0]:.2f}x" if isinstance(off, tuple) and isinstance(on, tuple) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.allow_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("benchmark_kernels: no CUDA device found; this benchmark needs a GPU. "
              "Run it on a CUDA machine, or pass --allow-cpu for a tiny smoke run of the harness (times meaningless).")
        return 0
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("benchmark_kernels: --allow-cpu needs TRITON_INTERPRET=1 (unset or 0 in the environment)")
        return 1
    device = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name() if cuda else "CPU (smoke run, Triton interpreter)"
    if args.e2e:
        table = format_e2e_table(run_e2e(torch, args, cuda, device), device_name)
    else:
        dtype = getattr(torch, args.dtype)
        copy_bw = measure_copy_bandwidth(torch, device, cuda, args.warmup, args.rep)
        exp_rate = measure_exp2_rate(device, cuda)
        rows = run_op_cases(torch, args, cuda, device, dtype, copy_bw, exp_rate)
        table = format_op_table(rows, copy_bw, exp_rate, device_name)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        print(f"[benchmark_kernels] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

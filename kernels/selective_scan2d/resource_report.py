"""Compile the selective-scan kernels ahead of time for a CUDA target (no GPU needed) and print their resource use.

    python -m metaformer_zoo.kernels.selective_scan2d.resource_report [--arch 90] [--configs 64x4x8,32x8x8]

Each config is ``BLOCK_L x BLOCK_D x num_warps`` and is compiled for the forward and the backward kernel (bf16 inputs,
4 routes, D / delta_bias / softplus on, N = 16). Prints registers per thread, stack (spill) bytes and shared memory, as
``cuobjdump -res-usage`` reports them for the cubin that Triton builds with its bundled ptxas. Use it to choose the
``METAFORMER_ZOO_SS2D_*`` tile settings before spending device time (see README.md, "GPU tuning").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    p.add_argument("--configs", default="64x4x8,64x8x8,32x8x8,64x2x8",
                   help="comma-separated BLOCK_L x BLOCK_D x num_warps")
    p.add_argument("--n", type=int, default=16, help="d_state N")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("resource_report: unset TRITON_INTERPRET (it compiles real kernels)")
        return 1
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton as tk

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    bf16 = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "g_ptr", "out_ptr", "du_ptr", "ddt_ptr"}
    bn = triton.next_power_of_2(args.n)

    def build(fn, consts, warps):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*bf16" if name in bf16 else "*fp32"
            else:
                sig[name] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", args.arch, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        try:
            out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        finally:
            os.unlink(f.name)
        res = dict(kv.split(":") for line in out.splitlines() if "REG:" in line for kv in line.split() if ":" in kv)
        return res.get("REG", "?"), res.get("STACK", "?"), k.metadata.shared

    common = dict(R=4, HAS_D=True, HAS_Z=False, HAS_BIAS=True, SOFTPLUS=True, BLOCK_N=bn)
    print(f"| kernel | BLOCK_L | BLOCK_D | warps | registers | stack (spill) B | shared B |")
    print("|---|---|---|---|---|---|---|")
    for cfg in args.configs.split(","):
        bl, bd, w = (int(v) for v in cfg.lower().split("x"))
        for name, fn, extra in (("fwd", tk._scan_fwd_kernel, {}), ("bwd", tk._scan_bwd_kernel, {"ATOMIC": False})):
            try:
                reg, stack, shared = build(fn, dict(common, BLOCK_L=bl, BLOCK_D=bd, **extra), w)
            except Exception as e:  # report and go on with the other configs
                reg, stack, shared = f"error: {type(e).__name__}", "-", "-"
            print(f"| {name} | {bl} | {bd} | {w} | {reg} | {stack} | {shared} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

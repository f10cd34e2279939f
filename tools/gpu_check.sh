#!/usr/bin/env bash
# The GPU proof of the zoo's Triton kernels, in one command (about 8 minutes on one H100-class GPU):
#
#   1. the `gpu`-marked parity tests (tests/test_kernel_gpu.py): the *compiled* kernels of every op (selective_scan2d /
#      selective_scan, fft_filter, strip_mix) against the PyTorch reference in float64, forward and every gradient,
#      float32 and bfloat16 inputs, odd sizes and the real model shapes;
#   2. tools/benchmark_kernels.py at the ViM2-T / AFFNet / RaftMLP / Strip-MLP shapes (batch 64 by default): eager
#      reference, torch.compile of the reference, zoo Triton, mamba-ssm when installed, and the roofline bound;
#   3. a summary: which ops passed every parity test (candidates for kernels.GPU_VERIFIED; record the GPU, date and
#      this output in kernels/README.md and the model cards when switching one on).
#
# Usage: bash tools/gpu_check.sh [batch]      env: PYTHON (default .venv/bin/python, else python), OUT_DIR
# Exit status: 0 when every parity test passed and the benchmark ran, 1 otherwise, 2 without a CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
BATCH="${1:-64}"
OUT="${OUT_DIR:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# compiled kernels, default dispatch: never the interpreter, no forced backend
unset TRITON_INTERPRET METAFORMER_ZOO_KERNELS

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY; run this on a GPU machine" >&2
    exit 2
fi
"$PY" - <<'EOF'
import torch, triton
print(f"gpu_check: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
      f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
try:
    import mamba_ssm
    print(f"gpu_check: mamba-ssm {getattr(mamba_ssm, '__version__', '?')} found: timed beside the zoo kernels")
except Exception as e:
    print(f"gpu_check: mamba-ssm not importable ({type(e).__name__}); its column stays empty")
EOF

start=$(date +%s)
echo "== 1/2 parity tests (compiled kernels vs the float64 reference) =="
timeout 270 "$PY" -m pytest -q -p no:cacheprovider -o addopts="--strict-markers" -m gpu -rfE \
    --junitxml="$OUT/parity.xml" tests/test_kernel_gpu.py
rc_tests=$?
echo "parity tests: exit $rc_tests after $(( $(date +%s) - start )) s"

echo "== 2/2 benchmark (batch $BATCH) =="
timeout 300 "$PY" tools/benchmark_kernels.py --batch "$BATCH" --warmup 10 --rep 50 --out "$OUT/kernels.md"
rc_bench=$?
echo "benchmark: exit $rc_bench after $(( $(date +%s) - start )) s"

echo "== summary =="
"$PY" - "$OUT/parity.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
ops = {"selective_scan2d": ("selective_scan2d_gpu", "selective_scan_1d_gpu"), "fft_filter": ("fft_filter_gpu",),
       "strip_mix": ("strip_mix_gpu",)}
try:
    cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
except Exception as e:
    print(f"no parity results ({type(e).__name__}: {e})")
    sys.exit(0)
print("| op | parity tests passed | failed | skipped | verdict |")
print("|---|---|---|---|---|")
for op, keys in ops.items():
    mine = [c for c in cases if any(k in c.get("name", "") for k in keys)]
    failed = sum(1 for c in mine if c.find("failure") is not None or c.find("error") is not None)
    skipped = sum(1 for c in mine if c.find("skipped") is not None)
    passed = len(mine) - failed - skipped
    ok = mine and failed == 0 and skipped == 0
    print(f"| {op} | {passed} | {failed} | {skipped} | {'GPU-verified candidate' if ok else 'NOT verified'} |")
EOF
echo "total $(( $(date +%s) - start )) s; benchmark table in $OUT/kernels.md, parity results in $OUT/parity.xml"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]

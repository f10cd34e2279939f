#!/usr/bin/env bash
# Create (or reuse) the project's environment in .venv/ at the repository root and install metaformer-zoo into it.
#
#   bash tools/setup_env.sh            # torch/torchvision pair + the package (editable) + test deps
#   PYTHON=python3.11 bash tools/setup_env.sh
#
# torch and torchvision are installed together, pinned as a working pair from the registry (the CUDA builds also
# run on CPU). A CPU-only torch wheel cannot load the registry's torchvision (its _C.so links CUDA libraries), and
# timm imports torchvision, so a mismatched pair breaks `import timm`: this script checks the pair after installing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.15.0 torchvision==0.29.2"}

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision.ops" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    $PIP install --quiet $TORCH_SPEC
fi
echo "[setup] installing metaformer-zoo (editable) with [dev] extras"
$PIP install --quiet -e ".[dev]"
.venv/bin/python - <<'PY'
import torch, torchvision, timm
import torchvision.ops  # loads torchvision's compiled ops: fails on a mismatched torch/torchvision pair
import metaformer_zoo
print(f"[setup] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"metaformer_zoo {metaformer_zoo.__version__}; {len(metaformer_zoo.list_variants())} zoo variants")
PY

#!/usr/bin/env bash
# Install the OpenMMLab dense-prediction stack for metaformer_zoo.dense into a Python environment:
#   mmengine, mmcv 2.1.0 built from source WITH its compiled ops (mmcv._ext), mmdet 3.3.0,
#   mmsegmentation 1.2.2, plus their undeclared needs (ftfy, regex).
#
# Usage (from anywhere):
#   bash tools/install_mm.sh                       # uses the active venv's python (or python3)
#   PYTHON=.venv/bin/python bash tools/install_mm.sh
#
# Environment knobs:
#   PYTHON           interpreter whose environment receives the packages (default: $VIRTUAL_ENV/bin/python,
#                    else python3)
#   MM_WHEEL_CACHE   where the mmcv wheel is built once and reused (default ~/.cache/metaformer_zoo/wheels)
#   MAX_JOBS         parallel compile jobs for the mmcv build (default 2)
#   MM_FORCE=1       reinstall even if `import mmcv._ext, mmdet, mmseg` already works
#
# Why a source build: mmdet 3.3 / mmseg 1.2 accept mmcv >=2.0.0rc4,<2.2.0 and mmcv 2.1.0 has no wheel for current
# torch. Its setup.py forces -std=c++17 while current torch headers require C++20, so the build runs through a
# small compiler wrapper that rewrites -std=c++14/17 to -std=c++20. mmcv-lite is not enough: `import mmdet.models`
# and `import mmseg.models` need mmcv._ext. The build takes ~10-20 min on 2 cores; the wheel is cached, so later
# runs (and fresh venvs on the same machine) install in seconds.
set -euo pipefail

MMCV_VERSION=2.1.0
MMDET_VERSION=3.3.0
MMSEG_VERSION=1.2.2

die() { echo "install_mm.sh: ERROR: $*" >&2; exit 1; }
log() { echo "install_mm.sh: $*"; }

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    else
        PYTHON="$(command -v python3 || true)"
    fi
fi
[[ -n "$PYTHON" ]] || die "no python interpreter found; set PYTHON=/path/to/venv/bin/python"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an executable interpreter; set PYTHON=/path/to/venv/bin/python"
log "target interpreter: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.prefix)'))"

check() { "$PYTHON" - <<'EOF' 2>/dev/null
import mmcv._ext, mmcv.ops, mmdet, mmseg, mmdet.models, mmseg.models  # noqa: F401
EOF
}

if [[ "${MM_FORCE:-0}" != "1" ]] && check; then
    log "mmcv (with ops), mmdet and mmseg already import: nothing to do."
    "$PYTHON" -c "import mmcv, mmdet, mmseg, mmengine; print('mmengine', mmengine.__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__)"
    exit 0
fi

"$PYTHON" -c "import torch" 2>/dev/null || die "torch is not importable with $PYTHON; install the project first (pip install -e .[dev])"

PIP=("$PYTHON" -m pip)
CACHE="${MM_WHEEL_CACHE:-$HOME/.cache/metaformer_zoo/wheels}"
TORCH_TAG="$("$PYTHON" -c 'import sys, torch; v = torch.__version__.split("+")[0]; print(f"torch{v}-py{sys.version_info[0]}{sys.version_info[1]}")')"
WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-$TORCH_TAG"
mkdir -p "$WHEEL_DIR"

log "build requirements: setuptools with pkg_resources (>=77,<81), wheel, ninja"
"${PIP[@]}" install -q "setuptools>=77,<81" wheel ninja || die "could not install setuptools/wheel/ninja"

# mmcv-lite shares the mmcv/ directory: remove it so it cannot shadow or later delete the full build's files.
if "${PIP[@]}" show -q mmcv-lite >/dev/null 2>&1; then
    log "removing mmcv-lite (it has no compiled ops and shares the mmcv/ package directory)"
    "${PIP[@]}" uninstall -y -q mmcv-lite
fi

shopt -s nullglob
wheels=("$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl)
if (( ${#wheels[@]} == 0 )); then
    command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler (c++/g++) on PATH: install build-essential"
    log "building mmcv $MMCV_VERSION with ops from source into $WHEEL_DIR (MAX_JOBS=${MAX_JOBS:-2}; ~10-20 min on 2 cores)"
    WRAP="$(mktemp -d)"
    trap 'rm -rf "$WRAP"' EXIT
    REAL_CXX="$(command -v "${CXX:-c++}" || command -v g++)"
    REAL_CC="$(command -v "${CC:-cc}" || command -v gcc)"
    for pair in "c++:$REAL_CXX" "g++:$REAL_CXX" "cc:$REAL_CC" "gcc:$REAL_CC"; do
        name="${pair%%:*}"; real="${pair#*:}"
        cat > "$WRAP/$name" <<EOF
#!/usr/bin/env bash
# metaformer_zoo install_mm.sh: raise mmcv's forced C++ standard to C++20 (needed by current torch headers)
args=()
for a in "\$@"; do
    case "\$a" in
        -std=c++14|-std=c++17|-std=gnu++14|-std=gnu++17) args+=("-std=c++20") ;;
        *) args+=("\$a") ;;
    esac
done
exec "$real" "\${args[@]}"
EOF
        chmod +x "$WRAP/$name"
    done
    (
        export PATH="$WRAP:$PATH" CXX="$WRAP/c++" CC="$WRAP/cc"
        export MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-2}"
        "${PIP[@]}" wheel --no-build-isolation --no-deps --no-binary mmcv "mmcv==$MMCV_VERSION" -w "$WHEEL_DIR"
    ) || die "building mmcv $MMCV_VERSION from source failed (see the compiler output above). Needs a C++20 compiler (g++ >= 10), python headers, ninja."
    wheels=("$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl)
    (( ${#wheels[@]} > 0 )) || die "pip wheel reported success but no mmcv wheel is in $WHEEL_DIR"
else
    log "reusing cached wheel ${wheels[0]}"
fi

log "installing mmcv from ${wheels[0]}, mmengine, mmdet $MMDET_VERSION, mmsegmentation $MMSEG_VERSION, ftfy, regex"
"${PIP[@]}" install -q "${wheels[0]}" mmengine "mmdet==$MMDET_VERSION" "mmsegmentation==$MMSEG_VERSION" ftfy regex \
    "setuptools>=77,<81" || die "pip install of the mm stack failed"

if ! check; then
    "$PYTHON" -c "import mmcv._ext, mmcv.ops, mmdet, mmseg, mmdet.models, mmseg.models" || true
    die "the mm stack installed but does not import (traceback above). A stale cached wheel? delete $WHEEL_DIR and rerun."
fi
"$PYTHON" -c "import mmcv, mmdet, mmseg, mmengine; print('install_mm.sh: OK: mmengine', mmengine.__version__, '| mmcv', mmcv.__version__, '(with ops) | mmdet', mmdet.__version__, '| mmseg', mmseg.__version__)"

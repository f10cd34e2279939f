"""Kernels for the hot token mixers, shipped as ``metaformer_zoo.kernels``.

One sub-package per op (``fft_filter``, ``strip_mix``, ``selective_scan2d``), each with ``reference.py`` (plain PyTorch,
the oracle), ``triton.py`` (forward and backward kernels) and an ``__init__.py`` holding the autograd formula and the
dispatch. Force a backend for every op with the environment variable
``METAFORMER_ZOO_KERNELS=reference|triton|auto`` (``mamba_ssm`` and ``cpu`` too, which only the selective scan has)
or per call with ``backend=``.

Dispatch rules (``resolve_backend``), see ``kernels/README.md``:

* ``auto`` picks Triton on CUDA tensors only for the ops listed in ``GPU_VERIFIED`` (their GPU parity test has passed
  on real hardware; none yet); on CPU tensors the compiled C kernel of the ops that have one (``CPU_KERNELS``: the
  selective scan, built with the machine's C compiler on first use; parity-tested on CPU in the default test stage);
  the PyTorch reference otherwise. Under ``TRITON_INTERPRET=1`` (CPU interpreter, tests) ``auto`` picks Triton for
  every op.
* ``cpu`` forces the C kernel on CPU tensors (an op without one resolves it like ``auto``). If it cannot be built
  (no compiler), one warning names the reason and the reference is used.
* ``triton`` opts in. If a kernel then fails to compile or launch (out of resources, unsupported architecture ...),
  ``run_kernel`` warns once per op, naming the op and the shape, and computes that call with the reference; the same
  op and shape skip the kernel from then on.
"""
import contextlib
import os
import warnings
from typing import Any, Callable, ContextManager, Dict, Optional, Set, Tuple, TypeVar

import torch

BACKENDS = ("auto", "reference", "triton", "mamba_ssm", "cpu")
OPS = ("fft_filter", "strip_mix", "selective_scan2d")

# ops whose Triton kernels passed their `gpu` parity test (tools/gpu_check.sh) on real hardware: only these are the
# `auto` default on CUDA. Record the GPU and date in kernels/README.md and the model cards when adding one.
GPU_VERIFIED: Dict[str, bool] = {op: False for op in OPS}

# ops with a compiled CPU kernel: op -> its loader module (``available()`` builds on the first call and says whether
# the kernel loads, ``build_error()`` why not); registered by the op's package
CPU_KERNELS: Dict[str, Any] = {}

_R = TypeVar("_R")
_failed: Set[Tuple[str, str]] = set()  # (op, shape key) whose kernel failed: go straight to the reference
_warned: Set[str] = set()


def resolve_backend(backend: str, *tensors, op: str = "") -> str:
    """Pick ``"triton"``, ``"reference"``, ``"cpu"`` or ``"mamba_ssm"`` for a call of ``op``.

    ``backend="auto"`` (default, or the ``METAFORMER_ZOO_KERNELS`` environment variable) gives Triton when every tensor
    is on a CUDA device, Triton imports and ``op`` is GPU-verified (``GPU_VERIFIED``), or when ``TRITON_INTERPRET=1`` is
    set (CPU interpreter, for tests); the C kernel when every tensor is on the CPU and ``op`` has one that builds
    (``CPU_KERNELS``); the reference otherwise. ``"mamba_ssm"`` and ``"cpu"`` are kept only for the ops that have them
    (the selective scan); other ops resolve them like ``"auto"``. A forced ``"cpu"`` whose kernel does not build gives
    one warning and ``"reference"``.
    """
    if backend == "auto":
        backend = os.environ.get("METAFORMER_ZOO_KERNELS", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS} "
                         "(argument backend= or the METAFORMER_ZOO_KERNELS environment variable)")
    if (backend == "mamba_ssm" and op != "selective_scan2d") or (backend == "cpu" and op not in CPU_KERNELS):
        backend = "auto"
    if backend == "cpu":
        return "cpu" if _cpu_kernel(op, warn=True) else "reference"
    if backend != "auto":
        return backend
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret:
        return "triton" if triton_available() else "reference"
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if on_cuda:
        return "triton" if GPU_VERIFIED.get(op, False) and triton_available() else "reference"
    on_cpu = bool(present) and all(t.device.type == "cpu" for t in present)
    if on_cpu and op in CPU_KERNELS and _cpu_kernel(op, warn=True):
        return "cpu"
    return "reference"


def _cpu_kernel(op: str, warn: bool) -> bool:
    """Whether ``op``'s C kernel is available; the first time it is not, warn once (naming why)."""
    loader = CPU_KERNELS[op]
    ok = loader.available()
    if not ok and warn and f"{op}:cpu" not in _warned:
        _warned.add(f"{op}:cpu")
        warnings.warn(f"metaformer_zoo.kernels: the CPU kernel of {op} is unavailable ({loader.build_error()}); "
                      f"computing it with the PyTorch reference instead (same result, several times slower on CPU). "
                      f"Install gcc (or set CC to a C compiler) to build it.", RuntimeWarning, stacklevel=3)
    return ok


def measure_ms(fn: Callable[[], object], device="cpu", warmup: int = 1, min_run_time: float = 1.0,
               grad_to_none=None) -> float:
    """Median milliseconds per call of ``fn`` after ``warmup`` untimed calls: the one timer of the zoo's benchmarks.

    CUDA: ``triton.testing.do_bench`` (device events, ``min_run_time`` seconds of repetitions, the ``.grad`` of
    ``grad_to_none`` reset before each call); elsewhere ``torch.utils.benchmark.Timer.blocked_autorange`` at the
    current ``torch.get_num_threads()``.
    """
    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        if not triton_available():
            raise RuntimeError("GPU timing needs triton (pip install 'metaformer-zoo[triton]')")
        from triton.testing import do_bench  # optional dependency, never imported with the kernel package
        extra = dict(grad_to_none=grad_to_none) if grad_to_none else {}
        return float(do_bench(fn, rep=min_run_time * 1e3, return_mode="median", **extra))
    from torch.utils.benchmark import Timer  # on first use: ``import metaformer_zoo`` does not pay for it

    def call():
        for t in grad_to_none or ():
            t.grad = None
        return fn()

    timer = Timer(stmt="fn()", globals={"fn": call if grad_to_none else fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def no_autocast(device_type: str) -> ContextManager:
    """A context that disables autocast for ``device_type``; a no-op where the device type has no autocast (``meta``).

    ``torch.autocast(device_type="meta", enabled=False)`` raises ``RuntimeError: unsupported scalarType``, so every op
    guards its float32 sections with this instead (models are counted and traced on the meta device).
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype if autocast is enabled for ``device_type``, else None (always None on ``meta``)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def shape_key(*tensors) -> str:
    """A short description of the call's tensors: shapes, dtypes and device, e.g. ``2x96x14x14:bfloat16@cuda``."""
    parts = []
    for t in tensors:
        if t is None:
            continue
        parts.append("x".join(str(s) for s in t.shape) + f":{str(t.dtype).replace('torch.', '')}@{t.device.type}")
    return ", ".join(parts)


def run_kernel(op: str, key: str, kernel: Callable[[], _R], fallback: Callable[[], _R], kind: str = "Triton") -> _R:
    """Run ``kernel()``; if it raises (Triton compile error, out of resources, launch failure ...), warn once for
    ``op``, naming the shape ``key`` and the error, and return ``fallback()`` (the reference) instead. A failed
    (op, key) skips the kernel on later calls. Genuine device out-of-memory errors propagate (the reference would need
    more memory, not less)."""
    if (op, key) in _failed:
        return fallback()
    try:
        return kernel()
    except Exception as e:  # noqa: BLE001 - any compile / launch failure of a kernel falls back
        if _is_oom(e):
            raise
        _failed.add((op, key))
        if f"{op}:{kind}" not in _warned:
            _warned.add(f"{op}:{kind}")
            warnings.warn(
                f"metaformer_zoo.kernels: the {kind} kernel of {op} failed for inputs {key} "
                f"({type(e).__name__}: {str(e).strip()[:300]}); computing it with the PyTorch reference instead "
                f"(same result, slower). Set METAFORMER_ZOO_KERNELS=reference to skip the kernels, or report the "
                f"error with the GPU model.", RuntimeWarning, stacklevel=3)
        return fallback()


def kernel_failed(op: str, key: str) -> bool:
    """Whether the Triton kernel of ``op`` already failed for the shape ``key`` in this process."""
    return (op, key) in _failed


def reset_kernel_failures() -> None:
    """Forget recorded kernel failures and warnings (tests; after changing the Triton configuration)."""
    _failed.clear()
    _warned.clear()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))

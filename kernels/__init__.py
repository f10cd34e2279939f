"""Kernels for the hot token mixers, shipped as ``metaformer_zoo.kernels``.

One sub-package per op (``fft_filter``, ``strip_mix``, ``selective_scan2d``), each with ``reference.py`` (plain PyTorch,
the oracle), ``triton.py`` (forward and backward kernels) and an ``__init__.py`` holding the autograd formula and the
dispatch. Force a backend for every op with the environment variable
``METAFORMER_ZOO_KERNELS=reference|triton|auto`` (``mamba_ssm`` too, which only the selective scan has) or per call
with ``backend=``.

Dispatch rules (``resolve_backend``), see ``kernels/README.md``:

* ``auto`` picks Triton on CUDA tensors only for the ops listed in ``GPU_VERIFIED`` (their GPU parity test has passed
  on real hardware; none yet), the PyTorch reference otherwise. Under ``TRITON_INTERPRET=1`` (CPU interpreter, tests)
  ``auto`` picks Triton for every op.
* ``triton`` opts in. If a kernel then fails to compile or launch (out of resources, unsupported architecture ...),
  ``run_kernel`` warns once per op, naming the op and the shape, and computes that call with the reference; the same
  op and shape skip the kernel from then on.
"""
import contextlib
import os
import warnings
from typing import Callable, ContextManager, Dict, Optional, Set, Tuple, TypeVar

import torch

BACKENDS = ("auto", "reference", "triton", "mamba_ssm")
OPS = ("fft_filter", "strip_mix", "selective_scan2d")

# ops whose Triton kernels passed their `gpu` parity test (tools/gpu_check.sh) on real hardware: only these are the
# `auto` default on CUDA. Record the GPU and date in kernels/README.md and the model cards when adding one.
GPU_VERIFIED: Dict[str, bool] = {op: False for op in OPS}

_R = TypeVar("_R")
_failed: Set[Tuple[str, str]] = set()  # (op, shape key) whose kernel failed: go straight to the reference
_warned: Set[str] = set()


def resolve_backend(backend: str, *tensors, op: str = "") -> str:
    """Pick ``"triton"``, ``"reference"`` or ``"mamba_ssm"`` for a call of ``op``.

    ``backend="auto"`` (default, or the ``METAFORMER_ZOO_KERNELS`` environment variable) gives Triton when every tensor
    is on a CUDA device, Triton imports and ``op`` is GPU-verified (``GPU_VERIFIED``), or when ``TRITON_INTERPRET=1`` is
    set (CPU interpreter, for tests); the reference otherwise. ``"mamba_ssm"`` is kept only for the selective scan
    (``op="selective_scan2d"``); other ops resolve it like ``"auto"``.
    """
    if backend == "auto":
        backend = os.environ.get("METAFORMER_ZOO_KERNELS", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS} "
                         "(argument backend= or the METAFORMER_ZOO_KERNELS environment variable)")
    if backend == "mamba_ssm" and op != "selective_scan2d":
        backend = "auto"
    if backend != "auto":
        return backend
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret:
        return "triton" if triton_available() else "reference"
    on_cuda = all(t.is_cuda for t in tensors if t is not None) and any(t is not None for t in tensors)
    if on_cuda and GPU_VERIFIED.get(op, False) and triton_available():
        return "triton"
    return "reference"


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


def run_kernel(op: str, key: str, kernel: Callable[[], _R], fallback: Callable[[], _R]) -> _R:
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
        if op not in _warned:
            _warned.add(op)
            warnings.warn(
                f"metaformer_zoo.kernels: the Triton kernel of {op} failed for inputs {key} "
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
    return isinstance(e, torch.cuda.OutOfMemoryError)

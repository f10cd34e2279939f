"""Kernels for the hot token mixers, shipped as ``metaformer_zoo.kernels``.

One sub-package per op (``fft_filter``, ``strip_mix``, ``selective_scan2d``), each with ``reference.py`` (plain PyTorch,
the oracle), ``triton.py`` (forward and backward kernels) and an ``__init__.py`` holding the autograd.Function and the
dispatch: Triton on CUDA tensors, the reference elsewhere. Force a backend for every op with the environment
variable ``METAFORMER_ZOO_KERNELS=reference|triton|auto`` or per call with ``backend=``.
"""
import contextlib
import os
from typing import ContextManager, Optional

import torch

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, *tensors) -> str:
    """Pick ``"triton"`` or ``"reference"`` for a call.

    ``backend="auto"`` (default, or the ``METAFORMER_ZOO_KERNELS`` environment variable) uses Triton when every tensor
    is on a CUDA device and Triton imports, or when ``TRITON_INTERPRET=1`` is set (CPU interpreter, for tests).
    """
    if backend == "auto":
        backend = os.environ.get("METAFORMER_ZOO_KERNELS", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if (on_cuda or interpret) and triton_available():
        return "triton"
    return "reference"


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

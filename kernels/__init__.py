"""Kernels for the hot token mixers, shipped as ``metaformer_zoo.kernels``.

One sub-package per op (``fft_filter``, ``strip_mix``, ``selective_scan2d``), each with ``reference.py`` (plain PyTorch,
the oracle), ``triton.py`` (forward and backward kernels) and an ``__init__.py`` holding the autograd.Function and the
dispatch: Triton on CUDA tensors, the reference elsewhere. Force a backend for every op with the environment
variable ``METAFORMER_ZOO_KERNELS=reference|triton|auto`` or per call with ``backend=``.
"""
import os

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

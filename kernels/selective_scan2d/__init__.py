"""2D selective scan (ViM2 / VMamba SS2D core): ``selective_scan``, ``cross_scan``, ``cross_merge``, ``selective_scan2d``.

Minimal dispatch written by the ViM2 helper: every call runs the plain-PyTorch reference (``reference.py``). The Triton
kernels (``triton.py``) and the final dispatch through ``metaformer_zoo.kernels.resolve_backend`` belong to the kernel
helper, who implements the same public names and signatures:

* ``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
  backend="auto")`` -- mamba-ssm ``selective_scan_ref`` semantics; u, delta, z (batch, dim, L); A (dim, N) real;
  B, C (batch, G, N, L) grouped or (batch, N, L) shared; D, delta_bias (dim,).
* ``cross_scan(x)``: (B, C, H, W) -> (B, 4, C, H*W); routes 0 row-major, 1 column-major, 2/3 their reverses.
* ``cross_merge(y, H=None, W=None)``: (B, 4, C, H*W) -> (B, C, H, W), the exact adjoint of ``cross_scan``
  (H, W are needed for non-square maps; square maps are inferred; a (B, 4, C, H, W) input carries its own H, W).
* ``selective_scan2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto")``: the fused
  4-route op, = ``cross_merge(selective_scan(cross_scan(x), ...))``.
"""
from . import reference
from .reference import selective_scan_ref_naive

__all__ = ["selective_scan", "cross_scan", "cross_merge", "selective_scan2d", "selective_scan_ref_naive"]

_BACKENDS = ("auto", "reference", "triton")


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {_BACKENDS}")
    # only the reference exists in this minimal dispatch; "triton" / "auto" fall back to it


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    _check_backend(backend)
    return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def cross_scan(x, backend="auto"):
    _check_backend(backend)
    return reference.cross_scan(x)


def cross_merge(y, H=None, W=None, backend="auto"):
    _check_backend(backend)
    return reference.cross_merge(y, H, W)


def selective_scan2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto"):
    _check_backend(backend)
    return reference.selective_scan2d(x, delta, A, B, C, D, delta_bias, delta_softplus)

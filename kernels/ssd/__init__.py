"""``ssd``: the selective semiseparable (state space duality) scan of Mamba-2, scalar decay per head.

Public entry point::

    ssd(x, dt, A, B, C, chunk_size=64, backend="auto") -> Tensor   # (B, L, H, P)

* ``x`` (B, L, H, P), ``dt`` (B, L, H) (positive: already softplus-ed and biased), ``A`` (H,) negative,
  ``B``, ``C`` (B, L, G, N) with ``G`` dividing ``H``; the layout of mamba-ssm's ``mamba_chunk_scan_combined``
  (without its ``D`` / ``z`` / ``dt_bias`` options, which the callers apply themselves).
* returns ``y`` with ``y_t = sum_{s<=t} (C_t . B_s) exp(dt_{s+1} A + ... + dt_t A) dt_s x_s``.

Exact formula and the float64 oracles (the explicit L x L semiseparable matrix, Hydra's quasiseparable matrix) in
:mod:`.reference`. Users: the ``hydra`` token mixer (``metaformer_zoo.mixers.hydra``), which runs its forward and its
backward (flipped) directions as one batched call.

Dispatch: ``backend`` ("auto" | "reference" | "triton", or env ``METAFORMER_ZOO_KERNELS``) is resolved by
``metaformer_zoo.kernels.resolve_backend``. The op has only its PyTorch reference so far (the chunked algorithm:
matmuls within chunks, states passed between chunks; linear in L, differentiable by autograd): every backend computes
it, and an explicit ``triton`` request warns once that no kernel exists yet.
"""
import warnings

import torch

from .. import resolve_backend
from .reference import DEFAULT_CHUNK_SIZE, hydra_explicit, hydra_matrix, ssd_chunked, ssd_explicit, ssd_matrix

__all__ = ["OP", "DEFAULT_CHUNK_SIZE", "ssd", "ssd_chunked", "ssd_explicit", "ssd_matrix", "hydra_matrix",
           "hydra_explicit"]

OP = "ssd"
_warned_no_kernel = False


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto") -> torch.Tensor:
    """The SSD scan ``y = M x`` (see the module docstring), in ``x``'s dtype; differentiable in every input."""
    global _warned_no_kernel
    resolved = resolve_backend(backend, x, dt, A, B, C, op=OP)
    if resolved != "reference" and not _warned_no_kernel:
        _warned_no_kernel = True
        warnings.warn(f"metaformer_zoo.kernels.ssd has no {resolved} kernel yet; computing it with the PyTorch "
                      f"reference (chunked scan) instead.", RuntimeWarning, stacklevel=2)
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size)[0]

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

Dispatch: ``backend`` ("auto" | "reference" | "triton" | "cpu", or env ``METAFORMER_ZOO_KERNELS``). ``auto`` and
``reference`` compute the PyTorch reference (the chunked algorithm: matmuls within chunks, states passed between
chunks; linear in L, differentiable by autograd). SSD is the selective scan with one decay per head: ``triton`` and
``cpu`` run it as ``selective_scan_tokens`` (``metaformer_zoo.kernels.selective_scan2d``) with ``u`` = x as
(B, L, H*P), ``delta`` = dt repeated over each head's P channels, ``A`` broadcast over the N states, B / C as
(B, G, L, N) groups,
so Hydra gets that op's Triton kernel (with its warn-once fallback) and its CPU kernel through the same dispatch.
Neither is the ``auto`` default: the reference's matmul form suits SSD's scalar decay, and the Triton scan is not
GPU-verified (``kernels/README.md``).
"""
import os

import torch

from .. import resolve_backend
from .reference import DEFAULT_CHUNK_SIZE, check_args, hydra_explicit, hydra_matrix, ssd_chunked, ssd_explicit, ssd_matrix

__all__ = ["OP", "DEFAULT_CHUNK_SIZE", "ssd", "ssd_chunked", "ssd_explicit", "ssd_matrix", "hydra_matrix",
           "hydra_explicit"]

OP = "ssd"


def _as_selective_scan(x, dt, A, B, C, backend: str) -> torch.Tensor:
    """The SSD scan through the token-major ``selective_scan_tokens`` (see the module docstring; x is already
    token-major, so the C kernel reads it without a transpose): (B, L, H, P) in x's dtype."""
    from ..selective_scan2d import selective_scan_tokens  # registers the scan's custom ops: imported on first use
    Bsz, L, H, P = x.shape
    N = B.shape[-1]
    delta = dt.unsqueeze(-1).expand(Bsz, L, H, P).reshape(Bsz, L, H * P)
    A_full = A.view(H, 1, 1).expand(H, P, N).reshape(H * P, N)
    y = selective_scan_tokens(x.reshape(Bsz, L, H * P), delta, A_full, B.transpose(1, 2), C.transpose(1, 2),
                              backend=backend)
    return y.view(Bsz, L, H, P)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto") -> torch.Tensor:
    """The SSD scan ``y = M x`` (see the module docstring), in ``x``'s dtype; differentiable in every input."""
    resolve_backend(backend, x, dt, A, B, C, op=OP)  # validates the backend name
    requested = backend if backend != "auto" else (os.environ.get("METAFORMER_ZOO_KERNELS") or "auto")
    if requested in ("triton", "cpu"):
        check_args(x, dt, A, B, C)
        return _as_selective_scan(x, dt, A, B, C, requested)
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size)[0]

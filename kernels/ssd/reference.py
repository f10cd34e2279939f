"""Plain-PyTorch reference of ``ssd``: the selective semiseparable scan of Mamba-2 (scalar decay per head).

Notation (Mamba-2 / ``mamba_chunk_scan_combined`` layout, dt already positive, e.g. after softplus):

* ``x`` (B, L, H, P) values, ``dt`` (B, L, H) step sizes, ``A`` (H,) negative decay rates,
* ``B``, ``C`` (B, L, G, N) input / output projections shared by the H / G heads of each group (head ``h`` uses
  group ``h // (H // G)``).

With ``a_t = dt_t * A`` the scan is ``h_t = exp(a_t) h_{t-1} + dt_t B_t x_t^T``, ``y_t = C_t^T h_t``, i.e. ``y = M x``
per head with the lower-triangular semiseparable matrix

    M[t, s] = (C_t . B_s) * exp(a_{s+1} + ... + a_t) * dt_s    (s <= t),   0 otherwise.

Functions:

* ``ssd_matrix`` / ``ssd_explicit``: that L x L matrix, built entry by entry (the float64 oracle, small L only);
* ``ssd_chunked``: the chunked algorithm of Mamba-2 (SSD, arXiv 2405.21060 §6): within each chunk a masked
  matmul with segment-sum decays, chunk states passed between chunks by a second (chunk-level) semiseparable
  product, then the states' contribution to each chunk's outputs. Linear in L; every gradient by autograd;
* ``hydra_matrix``: Hydra's quasiseparable mixer (arXiv 2407.09941) ``shift(SS(x)) + flip(shift(SS(flip(x)))) + D x``
  written out entry by entry: strictly lower part from the forward SS (``C`` of the previous token), strictly upper
  part from the backward SS (``C`` of the next token), a free (data-dependent) diagonal.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_CHUNK_SIZE", "check_args", "segsum", "ssd_matrix", "ssd_explicit", "ssd_chunked", "hydra_matrix",
           "hydra_explicit"]

DEFAULT_CHUNK_SIZE = 64


def check_args(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming the first argument whose shape does not fit the others."""
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, length, heads, headdim), got shape {list(x.shape)}")
    Bsz, L, H, _ = x.shape
    if tuple(dt.shape) != (Bsz, L, H):
        raise ValueError(f"ssd: dt must be (batch, length, heads)={(Bsz, L, H)}, got {list(dt.shape)}")
    if tuple(A.shape) != (H,):
        raise ValueError(f"ssd: A must be (heads,)=({H},) (one scalar decay per head), got {list(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (Bsz, L) or tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"ssd: B and C must both be (batch, length, groups, d_state) with batch, length = "
                         f"{(Bsz, L)}, got B {list(B.shape)}, C {list(C.shape)}")
    if H % B.shape[2]:
        raise ValueError(f"ssd: the number of heads ({H}) must be a multiple of the number of groups ({B.shape[2]})")


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """(B, L, G, N) -> (B, L, H, N): each group's projection repeated for its heads."""
    G = t.shape[2]
    return t if G == H else t.repeat_interleave(H // G, dim=2)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): ``out[i, j] = a_{j+1} + ... + a_i`` for ``j <= i``, ``-inf`` above the diagonal.

    Summed by a masked cumulative sum (not as a difference of prefix sums), so no cancellation in float32.
    """
    T = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, T)  # x[..., i, j] = a_i
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_matrix(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The scan as an explicit (B, H, L, L) matrix, entry by entry, in float64 (oracle; small L only)."""
    H = dt.shape[-1]
    dt, A = dt.double(), A.double()
    Bh, Ch = _heads(B.double(), H), _heads(C.double(), H)  # (B, L, H, N)
    a = (dt * A).transpose(1, 2)  # (B, H, L)
    cb = torch.einsum("bthn,bshn->bhts", Ch, Bh)
    return cb * torch.exp(segsum(a)) * dt.transpose(1, 2).unsqueeze(-2)


def ssd_explicit(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``y = M x`` with the explicit matrix of ``ssd_matrix``: (B, L, H, P) in float64."""
    check_args(x, dt, A, B, C)
    return torch.einsum("bhts,bshp->bthp", ssd_matrix(dt, A, B, C), x.double())


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int = DEFAULT_CHUNK_SIZE,
                initial_states: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan: ``(y (B, L, H, P), final_state (B, H, P, N))``, computed in ``x``'s dtype.

    ``L`` need not be a multiple of ``chunk_size``: the sequence is padded with ``dt = 0`` steps (decay 1, no
    input), which change neither the outputs nor the final state. ``initial_states`` (B, H, P, N) or None (zeros).
    """
    check_args(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be >= 1, got {chunk_size}")
    Bsz, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group: B and C are computed once per group
    T = min(chunk_size, L)
    pad = (-L) % T
    X = x * dt.unsqueeze(-1)
    a = dt * A  # (B, L, H)
    if pad:
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        a = F.pad(a, (0, 0, 0, pad))
    nc = (L + pad) // T
    X = X.reshape(Bsz, nc, T, G, R, P).permute(0, 1, 3, 4, 2, 5)  # (B, c, G, R, T, P)
    Bc = B.reshape(Bsz, nc, T, G, N).permute(0, 1, 3, 2, 4)  # (B, c, G, T, N)
    Cc = C.reshape(Bsz, nc, T, G, N).permute(0, 1, 3, 2, 4)
    a_cum = torch.cumsum(a.reshape(Bsz, nc, T, G, R).permute(0, 1, 3, 4, 2), dim=-1)  # (B, c, G, R, T)

    # 1. within each chunk: the diagonal blocks of M, (C B^T) * decay as a masked (T x T) matmul. The decays are
    # differences of the chunk's prefix sums (as mamba-ssm's kernels compute them); both are <= 0 where kept.
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    decay = torch.exp((a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~lower, float("-inf")))
    y = ((Cc @ Bc.transpose(-1, -2)).unsqueeze(3) * decay) @ X  # (B, c, G, R, T, P)

    # 2. each chunk's final state from its own inputs
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, c, G, R, T)
    states = (X * decay_to_end.unsqueeze(-1)).transpose(-1, -2) @ Bc.unsqueeze(3)  # (B, c, G, R, P, N)

    # 3. states passed between chunks: a chunk-level semiseparable product over the chunk totals
    if initial_states is None:
        init = torch.zeros_like(states[:, :1])
    else:
        if tuple(initial_states.shape) != (Bsz, H, P, N):
            raise ValueError(f"ssd: initial_states must be (batch, heads, headdim, d_state)={(Bsz, H, P, N)}, "
                             f"got {list(initial_states.shape)}")
        init = initial_states.reshape(Bsz, 1, G, R, P, N).to(states.dtype)
    states = torch.cat([init, states], dim=1)  # (B, c + 1, G, R, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1].permute(0, 2, 3, 1), (1, 0))))  # (B, G, R, c + 1, c + 1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1].reshape(Bsz, H, P, N)

    # 4. the incoming state's contribution to every output of the chunk
    y = y + (Cc.unsqueeze(3) @ states.transpose(-1, -2)) * torch.exp(a_cum).unsqueeze(-1)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(Bsz, nc * T, H, P)[:, :L]
    return y, final_state


def hydra_matrix(dt_fw: torch.Tensor, dt_bw: torch.Tensor, A: torch.Tensor, B_fw: torch.Tensor, C_fw: torch.Tensor,
                 B_bw: torch.Tensor, C_bw: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """Hydra's quasiseparable mixing matrix, (B, H, L, L) float64, entry by entry (oracle; small L only).

    All inputs are in the original token order (the backward direction's ``dt_bw`` / ``B_bw`` / ``C_bw`` are *not*
    flipped); ``diag`` (B, L, H) is the diagonal (Hydra: ``x_t . fc_D + D`` per head). With ``a = dt * A``:

    * ``i > j``: ``(C_fw[i-1] . B_fw[j]) * exp(a_fw[j+1] + ... + a_fw[i-1]) * dt_fw[j]``  (forward SS, shifted),
    * ``i < j``: ``(C_bw[i+1] . B_bw[j]) * exp(a_bw[i+1] + ... + a_bw[j-1]) * dt_bw[j]``  (backward SS, shifted),
    * ``i = j``: ``diag[i]``.
    """
    Bsz, L, H = dt_fw.shape
    A = A.double()
    out = torch.zeros(Bsz, H, L, L, dtype=torch.float64, device=dt_fw.device)
    f = [t.double() for t in (dt_fw, dt_bw, _heads(B_fw, H), _heads(C_fw, H), _heads(B_bw, H), _heads(C_bw, H))]
    dtf, dtb, Bf, Cf, Bb, Cb = f
    af, ab = dtf * A, dtb * A  # (B, L, H)
    for i in range(L):
        for j in range(L):
            if i > j:
                w = (Cf[:, i - 1] * Bf[:, j]).sum(-1) * torch.exp(af[:, j + 1:i].sum(1)) * dtf[:, j]
            elif i < j:
                w = (Cb[:, i + 1] * Bb[:, j]).sum(-1) * torch.exp(ab[:, i + 1:j].sum(1)) * dtb[:, j]
            else:
                w = diag[:, i].double()
            out[:, :, i, j] = w
    return out


def hydra_explicit(x: torch.Tensor, dt_fw: torch.Tensor, dt_bw: torch.Tensor, A: torch.Tensor, B_fw: torch.Tensor,
                   C_fw: torch.Tensor, B_bw: torch.Tensor, C_bw: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """``y = M x`` per head with ``M = hydra_matrix(...)``: x (B, L, H, P) -> (B, L, H, P) float64."""
    M = hydra_matrix(dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)
    return torch.einsum("bhts,bshp->bthp", M, x.double())

"""Hydra, the bidirectional quasiseparable matrix mixer (Hwang, Lahoti, Dao, Gu 2024, arXiv 2407.09941;
official code goombalab/hydra ``hydra/modules/hydra.py``), as a token mixer on (B, C, H, W) maps.

Per head, Hydra mixes the L tokens with the quasiseparable matrix

    y = shift(SS(x)) + flip(shift(SS(flip(x)))) + D x

where ``SS`` is a selective semiseparable (Mamba-2 / SSD, scalar decay per head) scan, ``shift`` moves every output one
token later (the first row is zero) and ``D`` is a data-dependent diagonal (``x_t . fc_D + D`` per head). The lower
triangle comes from the forward scan (``C`` of the previous token), the upper triangle from the backward scan (``C`` of
the next token); ``metaformer_zoo.kernels.ssd.hydra_matrix`` writes the matrix out entry by entry.

The block is the official one, parameter for parameter and under the official names (a state dict of the official
``Hydra(d_model=C, ...)`` loads strictly): ``in_proj`` C -> [z, x, B_fw, C_fw, B_bw, C_bw, dt_fw, dt_bw] (no bias),
a non-causal depthwise ``conv1d`` (kernel 7, padding 3, with bias) + SiLU over [x, B, C], ``dt = softplus(dt +
dt_bias)``, ``A = -exp(A_log)`` per head (shared by both directions, as are ``x`` and ``dt_bias``), the scans, the
diagonal term, ``norm`` (gated RMSNorm, normalise then multiply by SiLU(z)) and ``out_proj`` d_inner -> C. Not
carried over: the official ``learnable_init_states`` / ``dt_limit`` options (off by default there) and its fused
memory-efficient path (the same function).

On a 2D map the tokens are the H*W positions flattened row-major. ``cross_scan=True`` also runs the block on the
column-major order and averages the two: with Hydra's own two directions these are the 4 cross-scan routes of ViM2's
``selective_scan2d`` (row-major, column-major and their reverses).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_notrace_module

from ..kernels import ssd as ssd_ops
from . import register_mixer

__all__ = ["Hydra", "RMSNormGated"]


@torch.jit.ignore
def _ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
         backend: str) -> torch.Tensor:
    """The kernel package's SSD scan, called back in Python from TorchScript (dispatch and autograd unchanged)."""
    return ssd_ops.ssd(x, dt, A, B, C, chunk_size=chunk_size, backend=backend)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The scan runs in float32 (float64 stays float64), as mamba-ssm's ``mamba_chunk_scan_combined`` does."""
    return t if t.dtype == torch.float64 else t.float()


class RMSNormGated(nn.Module):
    """``rmsnorm(x) * weight * silu(z)`` (mamba-ssm ``layernorm_gated.RMSNorm`` with ``norm_before_gate=True``,
    ``group_size=None``, no bias), computed in float32 and returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = _acc(x)
        out = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps) * _acc(self.weight)
        return (out * F.silu(_acc(z))).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@register_notrace_module
@register_mixer("hydra")
class Hydra(nn.Module):
    """Hydra token mixer: (B, C, H, W) -> (B, C, H, W); ``forward_sequence`` is the official (B, L, C) block.

    Args (the official names and defaults):
        dim: channels (the official ``d_model``).
        d_state: state size N of each scan; d_conv: depthwise conv kernel (odd: the conv is non-causal, padding
            d_conv // 2); conv_init: if set, the conv weights are drawn uniformly from [-conv_init, conv_init].
        expand: d_inner = expand * dim; headdim: channels per head (d_inner must be a multiple of it); ngroups:
            groups of heads sharing B and C.
        dt_min, dt_max, dt_init_floor: the range of the initial step sizes (inverse-softplus ``dt_bias``).
        bias: bias of in_proj / out_proj; conv_bias: bias of the conv.
        chunk_size: chunk length of the SSD scan (official 256; a speed setting, the result is the same).
        cross_scan: also mix along the column-major order and average (the 4 cross-scan routes, see module doc).
        proj_drop: dropout after out_proj (the skeleton's ``proj_drop_rate``).
        backend: kernel backend of the scan (``metaformer_zoo.kernels.resolve_backend``).
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 64,
            d_conv: int = 7,
            conv_init: Optional[float] = None,
            expand: int = 2,
            headdim: int = 64,
            ngroups: int = 1,
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init_floor: float = 1e-4,
            bias: bool = False,
            conv_bias: bool = True,
            chunk_size: int = 256,
            cross_scan: bool = False,
            proj_drop: float = 0.,
            backend: str = "auto",
    ):
        super().__init__()
        d_inner = expand * dim
        if d_inner % headdim:
            raise ValueError(f"hydra: d_inner = expand * dim = {expand} * {dim} = {d_inner} is not a multiple of "
                             f"headdim={headdim}; pick a headdim dividing {d_inner} (mixer_kwargs=dict(headdim=...))")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"hydra: the {nheads} heads (d_inner / headdim) must split into ngroups={ngroups} "
                             f"equal groups; pick ngroups dividing {nheads}")
        if d_conv % 2 != 1:
            raise ValueError(f"hydra: d_conv must be odd (a centred, non-causal conv), got {d_conv}")
        self.dim = dim
        self.d_state = d_state
        self.d_inner = d_inner
        self.headdim = headdim
        self.nheads = nheads
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.cross_scan = cross_scan
        self.backend = backend

        # order: [z, x, B_fw, C_fw, B_bw, C_bw, dt_fw, dt_bw]
        bc = 2 * (2 * ngroups * d_state)
        self.in_proj = nn.Linear(dim, 2 * d_inner + bc + 2 * nheads, bias=bias)
        conv_dim = d_inner + bc
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv // 2,
                                bias=conv_bias)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()

        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.zeros(nheads))  # A = -1 per head
        self.D = nn.Parameter(torch.ones(nheads))
        self.fc_D = nn.Linear(d_inner, nheads, bias=False)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = RMSNormGated(d_inner, eps=1e-5)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def no_weight_decay(self):
        return {"dt_bias", "A_log", "D"}

    def ssm_inputs(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor]:
        """What the quasiseparable matrix is made of, for a (B, L, C) sequence, all in the original token order:
        ``(z, x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag)`` with x (B, L, H, P), dt (B, L, H), A (H,),
        B/C (B, L, G, N) and the diagonal ``diag`` (B, L, H); ``z`` (B, L, d_inner) is the gate."""
        Bsz, L, _ = u.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 4 * G * N, 2 * H], dim=-1)
        dt = F.softplus(dt + self.dt_bias.repeat(2))
        xBC = self.act(self.conv1d(xBC.transpose(1, 2)).transpose(1, 2))
        x, B_fw, C_fw, B_bw, C_bw = torch.split(xBC, [self.d_inner, G * N, G * N, G * N, G * N], dim=-1)
        diag = F.linear(x, self.fc_D.weight, self.D)  # (B, L, H)
        A = -torch.exp(_acc(self.A_log))
        return (z, x.reshape(Bsz, L, H, P), dt[..., :H], dt[..., H:], A, B_fw.reshape(Bsz, L, G, N),
                C_fw.reshape(Bsz, L, G, N), B_bw.reshape(Bsz, L, G, N), C_bw.reshape(Bsz, L, G, N), diag)

    def forward_sequence(self, u: torch.Tensor) -> torch.Tensor:
        """The official Hydra block on a (B, L, C) sequence -> (B, L, C)."""
        Bsz, L, _ = u.shape
        z, x, dt_fw, dt_bw, A, B_fw, C_fw, B_bw, C_bw, diag = self.ssm_inputs(u)
        # both directions in one scan call: the backward one on the flipped sequence
        xs = torch.cat([x, x.flip(1)], dim=0)
        dts = torch.cat([dt_fw, dt_bw.flip(1)], dim=0)
        Bs = torch.cat([B_fw, B_bw.flip(1)], dim=0)
        Cs = torch.cat([C_fw, C_bw.flip(1)], dim=0)
        y = _ssd(_acc(xs), _acc(dts), A, _acc(Bs), _acc(Cs), self.chunk_size, self.backend).to(x.dtype)
        y = F.pad(y[:, :-1], (0, 0, 0, 0, 1, 0))  # shift: y_t <- y_{t-1}, y_0 = 0
        y = y[:Bsz] + y[Bsz:].flip(1) + x * diag.unsqueeze(-1)
        y = self.norm(y.reshape(Bsz, L, self.d_inner), z)
        return self.proj_drop(self.out_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, C, H, W = x.shape
        if not self.cross_scan:
            y = self.forward_sequence(x.flatten(2).transpose(1, 2))  # row-major tokens
            return y.transpose(1, 2).reshape(Bsz, C, H, W)
        u = torch.cat([x.flatten(2).transpose(1, 2), x.transpose(2, 3).flatten(2).transpose(1, 2)], dim=0)
        y = self.forward_sequence(u)
        row = y[:Bsz].transpose(1, 2).reshape(Bsz, C, H, W)
        col = y[Bsz:].transpose(1, 2).reshape(Bsz, C, W, H).transpose(2, 3)
        return 0.5 * (row + col)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, d_inner={self.d_inner}, heads={self.nheads}x{self.headdim}, "
                f"d_state={self.d_state}, ngroups={self.ngroups}, cross_scan={self.cross_scan}")

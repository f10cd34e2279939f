"""ViM2 (Vision MambaMixer, arXiv 2403.19888) mixers: the SS2D selective token mixer and the selective channel mixer.

ViM2 has no official code; this is the reconstruction documented in ``model_cards/vim2.md`` (decisions of
``reference/vim2_scan.md`` §1.4). Both mixers map (B, C, H, W) -> (B, C, H, W) and call the scan through
``metaformer_zoo.kernels.selective_scan2d`` (the compiled C kernel on CPU, Triton where the dispatch picks it, the
PyTorch reference otherwise).

* ``SS2D`` (``register_mixer("ss2d")``): VMamba-v0 ``SS2D`` (MzeroMiko/VMamba ``classification/models/vmamba.py``,
  ``forward_corev0``): in_proj C -> 2*d_inner (x, z) -> depthwise 3x3 conv + SiLU -> 4-route cross scan -> per-route
  x_proj d_inner -> (R + 2N) and dt_proj R -> d_inner -> selective scan (B/C grouped per route, softplus(dt + bias))
  -> cross merge (sum) -> LayerNorm(d_inner) -> * SiLU(z) -> out_proj d_inner -> C. d_inner = 2C, R = ceil(C/16),
  N = 16. Mamba initialisation of A_logs, Ds, dt_projs (S4D-real A, D = 1, inverse-softplus dt bias). Same weights
  and function as VMamba's; the per-token projections are taken once per map position instead of on the
  cross-scanned copy (``selective_scan2d_tokens``: the copy is never made).
* ``SelectiveChannelMixer`` (``register_mixer("selective_channel")``): the "grouped channel sequence" reading of the
  paper's channel-wise S6 (decision 7): per token, CW-Linear C -> 2C, the 2C vector viewed as S = 2C/g steps of
  g-dim vectors; causal depthwise conv (k=3) + SiLU along the steps, a Mamba S6 along the steps forward and (separate
  parameters) on the flipped sequence, the two summed and gated by SiLU(Linear_g(step)) (the paper's MLP(x^T) on the
  transposed input), then CW-Linear 2C -> C. Resolution independent (tokens are batch).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_notrace_module

from ..kernels import selective_scan2d as scan_ops
from . import register_mixer

__all__ = ["SS2D", "SelectiveChannelMixer", "mamba_dt_bias_", "mamba_A_log", "mamba_init_"]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """SSM parameters enter the scan in float32 (float64 stays float64), as in Mamba / VMamba."""
    return t if t.dtype == torch.float64 else t.float()


# The kernel package is called through these two functions. TorchScript calls them back in Python
# (``torch.jit.ignore``): the kernel package's dispatch (C kernel on CPU, reference or Triton on CUDA,
# ``METAFORMER_ZOO_KERNELS``) and autograd stay the same in a scripted model, which therefore runs (and trains)
# in-process but cannot be ``torch.jit.save``d (the calls go back into Python).
@torch.jit.ignore
def _selective_scan2d_tokens(u: torch.Tensor, dt_in: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: torch.Tensor, delta_bias: torch.Tensor, dt_proj: torch.Tensor,
                             backend: str) -> torch.Tensor:
    return scan_ops.selective_scan2d_tokens(u, dt_in, A, B, C, D, delta_bias, delta_softplus=True, backend=backend,
                                            dt_proj=dt_proj)


@torch.jit.ignore
def _selective_scan_tokens(u: torch.Tensor, dt_in: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor, delta_bias: torch.Tensor, dt_proj: torch.Tensor,
                           backend: str) -> torch.Tensor:
    return scan_ops.selective_scan_tokens(u, dt_in, A, B, C, D, delta_bias, True, backend=backend, dt_proj=dt_proj)


# ---------------------------------------------------------------------------------------------------------------------
# Mamba initialisation (state-spaces/mamba mamba_simple.py; VMamba mamba_init)
# ---------------------------------------------------------------------------------------------------------------------
def mamba_A_log(d: int, d_state: int, copies: int = 1) -> torch.Tensor:
    """S4D-real init: A = -(1..N) for every channel, stored as log -> (copies * d, N)."""
    A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(copies * d, 1)
    return torch.log(A)


@torch.no_grad()
def mamba_dt_bias_(bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4):
    """dt = exp(U[log dt_min, log dt_max]) floored at dt_init_floor; bias = softplus^-1(dt) = dt + log(-expm1(-dt))."""
    dt = torch.exp(torch.rand(bias.shape, device=bias.device, dtype=torch.float32)
                   * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    return bias


@torch.no_grad()
def mamba_init_(module: nn.Module, dt_rank: int, dt_scale: float = 1.0, dt_min: float = 1e-3, dt_max: float = 1e-1,
                dt_init_floor: float = 1e-4):
    """Initialise a module's stacked SSM parameters (``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``,
    ``A_logs``, ``Ds``) as Mamba / VMamba do."""
    fan_in = module.x_proj_weight.shape[-1]
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear default init of the per-route x_proj (VMamba builds them as Linear)
    module.x_proj_weight.uniform_(-bound, bound)
    std = dt_rank ** -0.5 * dt_scale
    module.dt_projs_weight.uniform_(-std, std)
    mamba_dt_bias_(module.dt_projs_bias, dt_min, dt_max, dt_init_floor)
    K, d = module.dt_projs_bias.shape
    module.A_logs.copy_(mamba_A_log(d, module.A_logs.shape[-1], K))
    module.Ds.fill_(1.0)


class _SSMParams(nn.Module):
    """Stacked per-route SSM parameters with VMamba's names."""

    no_weight_decay_keys = ("A_logs", "Ds", "dt_projs_bias")

    def _make_ssm_params(self, K: int, d: int, d_state: int, dt_rank: int):
        self.x_proj_weight = nn.Parameter(torch.empty(K, dt_rank + 2 * d_state, d))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d))
        self.A_logs = nn.Parameter(torch.empty(K * d, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d))

    def reset_parameters(self):
        """Every Linear child trunc-normal 0.02 with zero bias (in declaration order), then the Mamba init of the SSM
        parameters (``mamba_init_``)."""
        for lin in self.children():
            if isinstance(lin, nn.Linear):
                trunc_normal_(lin.weight, std=.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        mamba_init_(self, self.dt_rank, **self._dt_init)


@register_notrace_module
@register_mixer("ss2d")
class SS2D(_SSMParams):
    """VMamba-v0 2D selective scan token mixer (the ViM2 "Selective Token Mixer", 4 cross-scan routes).

    Args:
        dim: channels C. d_state: N (16). ssm_ratio: d_inner / C (2). dt_rank: R ("auto" = ceil(C / 16)).
        d_conv: depthwise conv kernel (3). conv_bias: bias of that conv (True). bias: bias of in/out_proj (False).
        dt_min, dt_max, dt_init_floor, dt_scale: Mamba dt init. proj_drop: dropout after out_proj.
        backend: kernel backend ("auto" | "reference" | "triton").
    """

    def __init__(self, dim: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank="auto", d_conv: int = 3,
                 conv_bias: bool = True, bias: bool = False, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, proj_drop: float = 0., backend: str = "auto",
                 **kwargs):
        super().__init__()
        d_inner = int(ssm_ratio * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_inner, self.d_state, self.K = d_inner, d_state, 4
        self.backend = backend
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        self._make_ssm_params(self.K, d_inner, d_state, self.dt_rank)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self.dropout = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self._dt_init = dict(dt_scale=dt_scale, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, _, H, W = x.shape
        xz = self.in_proj(x.permute(0, 2, 3, 1))  # (B, H, W, 2 d_inner)
        u, z = xz.chunk(2, dim=-1)
        u = self.conv2d(u.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        u = self.act(u).permute(0, 2, 3, 1)  # (B, H, W, d_inner), channels-last
        # VMamba projects each route's cross-scanned sequence; the projections act per token, so they are taken once
        # per position here (map order, (B, L, 4, R + 2N)) and the scan reads route r's steps through its index.
        # dt_proj (R -> d_inner per route) goes to the scan with its low-rank input: the C kernel applies it per step
        # (the (B, 4, L, d_inner) delta is never written); other backends apply it first
        K, R, N = self.K, self.dt_rank, self.d_state
        x_dbl = F.linear(u, self.x_proj_weight.reshape(-1, self.d_inner)).view(Bsz, H * W, K, -1)
        dt_in, Bs, Cs = (t.permute(0, 2, 1, 3) for t in torch.split(x_dbl, [R, N, N], dim=-1))  # (B, K, L, .)
        As = -torch.exp(_acc(self.A_logs))
        y = _selective_scan2d_tokens(u, dt_in, As, Bs, Cs, _acc(self.Ds), _acc(self.dt_projs_bias).view(-1),
                                     self.dt_projs_weight, self.backend)  # (B, H, W, d_inner)
        y = self.out_norm(y.to(z.dtype))
        y = y * F.silu(z)
        y = self.dropout(self.out_proj(y))
        return y.permute(0, 3, 1, 2)


@register_notrace_module
@register_mixer("selective_channel")
class SelectiveChannelMixer(_SSMParams):
    """ViM2 Selective Channel Mixer, "grouped channel sequence" reading (resolution independent).

    Args:
        dim: channels C. expand: width of the CW-Linear (2 -> 2C). group_size: g, the step vector width (16); the
            sequence has S = expand * C / g steps. d_state: N (16). dt_rank: "auto" = ceil(g / 16). d_conv: causal
            depthwise conv kernel along the steps (3). bidirectional: forward + flipped S6 (True). bias: bias of the
            CW-Linears and the gate (False). proj_drop: dropout after the output CW-Linear.
    """

    def __init__(self, dim: int, expand: float = 2.0, group_size: int = 16, d_state: int = 16, dt_rank="auto",
                 d_conv: int = 3, bidirectional: bool = True, bias: bool = False, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0, proj_drop: float = 0.,
                 backend: str = "auto", **kwargs):
        super().__init__()
        d_inner = int(expand * dim)
        if d_inner % group_size != 0:
            raise ValueError(f"SelectiveChannelMixer: expand * dim = {d_inner} must be divisible by "
                             f"group_size = {group_size}; choose a group_size that divides it")
        g = group_size
        self.d_inner, self.group_size, self.steps = d_inner, g, d_inner // g
        self.K = 2 if bidirectional else 1
        self.dt_rank = math.ceil(g / 16) if dt_rank == "auto" else int(dt_rank)
        self.d_state = d_state
        self.d_conv = d_conv
        self.backend = backend
        self.in_proj = nn.Linear(dim, d_inner, bias=bias)  # CW-Linear C -> 2C
        self.gate_proj = nn.Linear(g, g, bias=bias)  # x_MLP = MLP(x^T): per-step Linear on the g-dim step vectors
        self.conv1d = nn.Conv1d(self.K * g, self.K * g, d_conv, padding=d_conv - 1, groups=self.K * g, bias=True)
        self.act = nn.SiLU()
        self._make_ssm_params(self.K, g, d_state, self.dt_rank)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)  # CW-Linear 2C -> C
        self.dropout = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self._dt_init = dict(dt_scale=dt_scale, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Bsz, C, H, W = x.shape
        K, g, S = self.K, self.group_size, self.steps
        t = x.permute(0, 2, 3, 1).reshape(-1, C)  # tokens are batch: (M, C)
        M = t.shape[0]
        s = self.in_proj(t).view(M, S, g)  # the 2C vector as S steps of g-dim vectors
        z = F.silu(self.gate_proj(s))  # (M, S, g)
        u = torch.cat([s, s.flip(1)], dim=-1) if K == 2 else s  # (M, S, K*g): forward, flipped; step-major
        # the causal depthwise conv along the steps (conv1d's weights), run as a (d_conv, 1) conv2d on the step-major
        # map left-padded by d_conv - 1 steps: channels-last in and out, so no transposes around it
        u = F.pad(u, (0, 0, self.d_conv - 1, 0)).unsqueeze(2).permute(0, 3, 1, 2)  # (M, K*g, S + d_conv - 1, 1)
        u = F.conv2d(u, self.conv1d.weight.unsqueeze(-1), self.conv1d.bias, groups=K * g)  # (M, K*g, S, 1)
        u = self.act(u.permute(0, 2, 3, 1).reshape(M, S, K * g))  # (M, S, K*g), channels innermost for the scan
        x_dbl = torch.einsum("mskd,kcd->mskc", u.view(M, S, K, g), self.x_proj_weight)  # (M, S, K, R + 2N)
        # the per-direction dt projections go to the scan with their rank-R input (a grouped dt_proj: the C kernel
        # forms delta per step, other backends project first)
        dt_in, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (M, S, K, .)
        As = -torch.exp(_acc(self.A_logs))
        y = _selective_scan_tokens(u, dt_in, As, Bs.permute(0, 2, 1, 3), Cs.permute(0, 2, 1, 3), _acc(self.Ds),
                                   _acc(self.dt_projs_bias).view(-1), self.dt_projs_weight, self.backend)  # (M, S, K*g)
        y = y[..., :g] + y[..., g:].flip(1) if K == 2 else y
        y = y.to(z.dtype) * z  # (M, S, g)
        y = self.dropout(self.out_proj(y.reshape(M, self.d_inner)))
        return y.view(Bsz, H, W, C).permute(0, 3, 1, 2)

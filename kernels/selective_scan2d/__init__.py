"""2D selective scan (ViM2 / VMamba SS2D core): ``selective_scan``, ``cross_scan``, ``cross_merge``,
``selective_scan2d``.

Public API (reference semantics in ``reference.py``; algorithm, layouts and tolerances in ``README.md``):

* ``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
  backend="auto")`` -- mamba-ssm ``selective_scan_ref`` semantics; u, delta, z (batch, dim, L); A (dim, N) real;
  B, C (batch, G, N, L) grouped (dim % G == 0) or (batch, N, L) shared; D, delta_bias (dim,). Float32 accumulation;
  output in u's dtype (+ last state (batch, dim, N) float32 if requested).
* ``cross_scan(x)``: (B, C, H, W) -> (B, 4, C, H*W); routes 0 row-major, 1 column-major, 2/3 their reverses.
* ``cross_merge(y, H=None, W=None)``: (B, 4, C, H*W) -> (B, C, H, W), the exact adjoint of ``cross_scan``.
* ``selective_scan2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto")``: the fused
  4-route op = ``cross_merge(selective_scan(cross_scan(x), ...))``; x (B, C, H, W) (any strides, channels-last
  included); delta (B, 4, C, H*W) in route order; A (4*C, N); B, C (B, 4, N, H*W); D, delta_bias (4*C,).

Dispatch: ``metaformer_zoo.kernels.resolve_backend(backend, *tensors, op="selective_scan2d")``: the plain-PyTorch
reference by default (also on CUDA until the kernels are GPU-verified, see ``kernels/README.md``); Triton under
``TRITON_INTERPRET=1`` or when forced (``backend="triton"`` / ``METAFORMER_ZOO_KERNELS=triton``), with a warn-once
fallback to the reference if a kernel fails to compile or launch; ``backend="mamba_ssm"``: mamba-ssm's CUDA
``selective_scan_fn`` when installed (never a dependency).

The Triton path is two ``torch.library`` custom ops, ``metaformer_zoo::selective_scan_fwd`` and
``metaformer_zoo::selective_scan_bwd``, with fake (meta) implementations and ``register_autograd``: torch.compile and
make_fx see each as one node, never a graph break, and AOTAutograd puts the backward op in the backward graph. The
Triton module is imported lazily on the first Triton call, so ``TRITON_INTERPRET`` only needs to be set before that.

Autocast: both paths run with autocast disabled and accumulate in float32 whatever the input dtypes (inputs may be
mixed, e.g. bf16 activations with fp32 A / D); the output dtype is u's (x's) dtype. Gradients come back in each
input's dtype.

Differences between the paths: the Triton ``return_last_state`` state carries no gradient (as mamba-ssm's CUDA
function); the reference's does. Complex A and time-invariant (dim, N) B / C are not supported (clear ValueError).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from metaformer_zoo.kernels import CPU_KERNELS, no_autocast, resolve_backend, run_kernel, shape_key

from . import cpu, reference
from .reference import selective_scan_ref_naive

__all__ = ["selective_scan", "selective_scan_tokens", "cross_scan", "cross_merge", "selective_scan2d",
           "selective_scan2d_tokens",
           "selective_scan_ref_naive", "mamba_ssm_available"]

OP = "selective_scan2d"  # the op name of both public functions in the dispatch (GPU_VERIFIED, fallback warnings)
CPU_KERNELS[OP] = cpu


def _tk():
    """The Triton kernel module, imported on first use (TRITON_INTERPRET must be set before this)."""
    from . import triton as tk
    return tk


# ----------------------------------------------------------------------------------------------------------------------
# kernel layouts: every op is run as R routes x G groups over a (B, Cu, H, W) view of u
#   mode2d: u = x (B, C, H, W), delta (B, 4, C, L), B/C (B, 4, N, L): R = 4, G = 1
#   1d:     u (B, D, L) -> (B, D, 1, L), delta (B, D, L) -> (B, G, D/G, L), B/C (B, G, N, L): R = 1
# ----------------------------------------------------------------------------------------------------------------------
def _layout(u, delta, z, B, mode2d: bool):
    if mode2d:
        return u, delta, z, 4, 1
    G = B.shape[1]
    u4 = u.unsqueeze(2)
    dt4 = delta.unflatten(1, (G, u.shape[1] // G))
    z4 = z.unsqueeze(2) if z is not None else None
    return u4, dt4, z4, 1, G


def _states_shape(u, A, B, mode2d: bool):
    if mode2d:
        Bsz, Cu, H, W = u.shape
        R, G = 4, 1
    else:
        Bsz, Cu, L = u.shape
        H, W = 1, L
        R, G = 1, B.shape[1]
    nc = _tk().n_chunks(H * W, u.device.type)
    return (Bsz, G * R, Cu // G, nc, A.shape[1])


@torch.library.custom_op("metaformer_zoo::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                 delta_bias: Optional[Tensor], delta_softplus: bool, mode2d: bool) -> Tuple[Tensor, Tensor]:
    """Triton forward. B, C are 4-d here. Returns (out in u's dtype and shape, chunk-end states fp32)."""
    def kernel():
        u4, dt4, z4, R, G = _layout(u, delta, z, B, mode2d)
        out4, states = _tk().scan_fwd(u4, dt4, A, B, C, D, z4, delta_bias, delta_softplus, R, G, u.dtype)
        return (out4 if mode2d else out4.squeeze(2)), states

    def fallback():
        """The reference result; of the states only the last one is filled (``return_last_state`` reads it): the
        backward of a call that fell back falls back too, it never reads them."""
        try:
            shape = _states_shape(u, A, B, mode2d)
        except Exception:  # noqa: BLE001 - the Triton module itself does not import: one chunk
            shape = (u.shape[0], 4 if mode2d else B.shape[1], u.shape[1] // (1 if mode2d else B.shape[1]), 1,
                     A.shape[1])
        states = u.new_zeros(shape, dtype=torch.float32)
        with torch.no_grad():
            if mode2d:
                out = _reference_call(u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode2d)
            else:
                out, last = reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
                states[:, :, :, -1, :] = last.view(shape[0], shape[1], shape[2], shape[4])
        return torch.empty_like(u).copy_(out), states

    return run_kernel(OP, _key(u, delta, B), kernel, fallback)


def _key(u, delta, B) -> str:
    return shape_key(u, delta, B)


def _reference_call(u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode2d):
    if mode2d:
        return reference.selective_scan2d(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _reference_grads(g, u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode2d) -> List[Tensor]:
    """Every input gradient of the reference path, in the backward op's output layout (the fallback of the backward
    kernel; explicit formulas: autograd does not record inside a custom op)."""
    if mode2d:
        dx, ddt, dA, dB, dC, dD, dbias = reference.selective_scan2d_backward(g, u, delta, A, B, C, D, delta_bias,
                                                                             delta_softplus)
        du, dz = dx, None
    else:
        du, ddt, dA, dB, dC, dD, dz, dbias = reference.selective_scan_backward(g, u, delta, A, B, C, D, z, delta_bias,
                                                                               delta_softplus)
    empty = u.new_empty((0,))
    return [du, ddt, dA, dB, dC, empty if dD is None else dD, empty if dz is None else dz,
            empty if dbias is None else dbias]


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode2d):
    u4 = u if mode2d else u.unsqueeze(2)
    out4 = torch.empty_like(u4)
    out = out4 if mode2d else out4.squeeze(2)
    return out, u.new_empty(_states_shape(u, A, B, mode2d), dtype=torch.float32)


@torch.library.custom_op("metaformer_zoo::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(g: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], states: Tensor, delta_softplus: bool,
                 mode2d: bool) -> List[Tensor]:
    """Triton backward. Returns [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias] in the inputs' dtypes and shapes;
    dD / dz / ddelta_bias are empty (0,) tensors when that input is None."""
    def kernel():
        u4, dt4, z4, R, G = _layout(u, delta, z, B, mode2d)
        g4 = g if mode2d else g.unsqueeze(2)
        du4, ddt, dA, dB, dC, dD, dz4, dbias = _tk().scan_bwd(g4, u4, dt4, A, B, C, D, z4, delta_bias, states,
                                                              delta_softplus, R, G)
        du = du4 if mode2d else du4.squeeze(2)
        dz = (dz4 if mode2d else dz4.squeeze(2)) if z is not None else None
        return [du, ddt.view(delta.shape), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                dD.to(D.dtype) if D is not None else u.new_empty((0,)),
                dz if z is not None else u.new_empty((0,)),
                dbias.to(delta_bias.dtype) if delta_bias is not None else u.new_empty((0,))]

    def fallback():
        grads = _reference_grads(g, u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode2d)
        grads[0] = torch.empty_like(u).copy_(grads[0])
        return grads

    # the states of a forward that fell back are placeholders: its backward must fall back too
    return run_kernel(OP, _key(u, delta, B), kernel, fallback)


@_scan_bwd_op.register_fake
def _(g, u, delta, A, B, C, D, z, delta_bias, states, delta_softplus, mode2d):
    u4 = u if mode2d else u.unsqueeze(2)
    du4 = torch.empty_like(u4)
    du = du4 if mode2d else du4.squeeze(2)
    return [du, delta.new_empty(delta.shape), torch.empty_like(A, memory_format=torch.contiguous_format),
            B.new_empty(B.shape), C.new_empty(C.shape),
            D.new_empty(D.shape) if D is not None else u.new_empty((0,)),
            (torch.empty_like(u4, dtype=z.dtype) if mode2d else torch.empty_like(u4, dtype=z.dtype).squeeze(2))
            if z is not None else u.new_empty((0,)),
            delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else u.new_empty((0,))]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode2d = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.delta_softplus = delta_softplus
    ctx.mode2d = mode2d
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, gout, gstates):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    if gout is None:
        return (None,) * 10
    du, ddt, dA, dB, dC, dD, dz, dbias = _scan_bwd_op(gout, u, delta, A, B, C, D, z, delta_bias, states,
                                                      ctx.delta_softplus, ctx.mode2d)
    return (du, ddt, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None)


_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------------
def _to_groups(t: Tensor, G: int) -> Tensor:
    """(b, Gt, N, L) -> (b, G, N, L) with group g of the result = group g // (G / Gt) of t (a view when Gt == 1)."""
    b, Gt, N, L = t.shape
    if Gt == G:
        return t
    return t.unsqueeze(2).expand(b, Gt, G // Gt, N, L).reshape(b, G, N, L)


# ----------------------------------------------------------------------------------------------------------------------
# optional backend: mamba-ssm's CUDA selective_scan_fn (never a dependency; backend="mamba_ssm")
# ----------------------------------------------------------------------------------------------------------------------
MAMBA_NEEDS_CUDA = True  # mamba-ssm's kernel is CUDA-only (tests with a fake module turn this off)


def _mamba_scan_fn():
    """mamba-ssm's ``selective_scan_fn`` or None when mamba-ssm (with its CUDA extension) does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - not installed, or its compiled extension / dependencies are missing
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """Whether ``backend="mamba_ssm"`` can run: mamba-ssm imports and a CUDA device is present."""
    return _mamba_scan_fn() is not None and (torch.cuda.is_available() or not MAMBA_NEEDS_CUDA)


def _mamba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    fn = _mamba_scan_fn()
    if fn is None:
        raise RuntimeError("backend='mamba_ssm' needs the mamba-ssm package with its CUDA extension "
                           "(pip install mamba-ssm on a CUDA machine); use backend='auto' or 'reference' otherwise")
    if MAMBA_NEEDS_CUDA and not u.is_cuda:
        raise ValueError(f"backend='mamba_ssm' runs on CUDA tensors only, got {u.device.type} tensors; "
                         "use backend='auto' or 'reference'")
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    if B4.shape[1] != C4.shape[1]:  # mamba-ssm needs one group count
        G = math.lcm(B4.shape[1], C4.shape[1])
        B4, C4 = _to_groups(B4, G), _to_groups(C4, G)
    f32 = torch.float32
    return fn(u, delta.to(u.dtype), A.to(f32), B4, C4, D.to(f32) if D is not None else None, z,
              delta_bias.to(f32) if delta_bias is not None else None, delta_softplus, return_last_state)


def _empty_input(*tensors) -> bool:
    return any(t is not None and t.numel() == 0 for t in tensors)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """Selective scan with mamba-ssm ``selective_scan_ref`` semantics (see the module docstring)."""
    be = resolve_backend(backend, u, delta, A, B, C, D, z, delta_bias, op=OP)
    with no_autocast(u.device.type):
        if be == "reference" or _empty_input(u, A):
            return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        reference._check_scan_args(u, delta, A, B, C, D, z, delta_bias)
        if be == "cpu":
            return run_kernel(OP, _key(u, delta, B), lambda: cpu.scan(u, delta, A, B, C, D, z, delta_bias,
                                                                     delta_softplus, return_last_state, False),
                              lambda: reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                               return_last_state), kind="CPU")
        if be == "mamba_ssm":
            return _mamba_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        B4 = B.unsqueeze(1) if B.dim() == 3 else B
        C4 = C.unsqueeze(1) if C.dim() == 3 else C
        if B4.shape[1] != C4.shape[1]:  # different group counts: run at the common refinement
            G = math.lcm(B4.shape[1], C4.shape[1])
            B4, C4 = _to_groups(B4, G), _to_groups(C4, G)
        out, states = torch.ops.metaformer_zoo.selective_scan_fwd(u, delta, A, B4, C4, D, z, delta_bias,
                                                                   bool(delta_softplus), False)
        if return_last_state:
            return out, states[:, :, :, -1, :].reshape(u.shape[0], u.shape[1], A.shape[1])
        return out


def cross_scan(x, backend="auto"):
    """(B, C, H, W) -> (B, 4, C, H*W). A plain PyTorch copy on every backend (the fused op never materialises it)."""
    resolve_backend(backend, x, op=OP)  # validates the backend name
    return reference.cross_scan(x)


def cross_merge(y, H=None, W=None, backend="auto"):
    """(B, 4, C, H*W) -> (B, C, H, W), the adjoint of ``cross_scan``. Plain PyTorch on every backend."""
    resolve_backend(backend, y, op=OP)
    return reference.cross_merge(y, H, W)


def _check_2d_params(op, Bsz, Ch, L, delta, A, B, C, D, delta_bias, map_order: bool):
    """Shapes of the 2D op's tensors: delta (B, 4, C, L) / B, C (B, 4, N, L) in route order, or (B, 4, L, C) /
    (B, 4, L, N) in map order (``selective_scan2d_tokens``). delta None: checked by the caller (its low-rank form)."""
    order = "map order" if map_order else "route order"
    want = (Bsz, 4, L, Ch) if map_order else (Bsz, 4, Ch, L)
    if delta is not None and tuple(delta.shape) != want:
        raise ValueError(f"{op}: delta must be {'(B, 4, H*W, C)' if map_order else '(B, 4, C, H*W)'}={want} in "
                         f"{order}, got {list(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != 4 * Ch or A.is_complex():
        raise ValueError(f"{op}: A must be real (4*C, N)=({4 * Ch}, N), got {list(A.shape)} {A.dtype}")
    N = A.shape[1]
    want = (Bsz, 4, L, N) if map_order else (Bsz, 4, N, L)
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must be {'(B, 4, H*W, N)' if map_order else '(B, 4, N, H*W)'}={want}"
                             f"{' in map order' if map_order else ''}, got {list(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (4 * Ch,):
            raise ValueError(f"{op}: {name} must be (4*C,)=({4 * Ch},), got {list(t.shape)}")


def _check_2d(x, delta, A, B, C, D, delta_bias, map_order: bool = False):
    """x (B, C, H, W) with route-order delta / B / C, or channels-last u (B, H, W, C) with map-order ones."""
    op, layout = ("selective_scan2d_tokens", "channels-last (B, H, W, C)") if map_order else \
        ("selective_scan2d", "(B, C, H, W)")
    if x.dim() != 4:
        raise ValueError(f"{op}: {'u' if map_order else 'x'} must be {layout}, got shape {list(x.shape)}")
    Bsz, H, W, Ch = x.shape if map_order else (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    _check_2d_params(op, Bsz, Ch, H * W, delta, A, B, C, D, delta_bias, map_order)


def selective_scan2d(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto"):
    """Fused 4-route selective scan: ``cross_merge(selective_scan over the routes of cross_scan(x))``."""
    be = resolve_backend(backend, x, delta, A, B, C, D, delta_bias, op=OP)
    with no_autocast(x.device.type):
        if be == "reference" or _empty_input(x, A):
            return reference.selective_scan2d(x, delta, A, B, C, D, delta_bias, delta_softplus)
        _check_2d(x, delta, A, B, C, D, delta_bias)
        if be == "cpu":
            return run_kernel(OP, _key(x, delta, B), lambda: cpu.scan(x, delta, A, B, C, D, None, delta_bias,
                                                                     delta_softplus, False, True),
                              lambda: reference.selective_scan2d(x, delta, A, B, C, D, delta_bias, delta_softplus),
                              kind="CPU")
        if be == "mamba_ssm":  # cross_scan -> mamba-ssm over the 4C route channels (B / C grouped per route) -> merge
            Bsz, Ch, H, W = x.shape
            xs = reference.cross_scan(x).reshape(Bsz, 4 * Ch, H * W)
            ys = _mamba_selective_scan(xs, delta.reshape(Bsz, 4 * Ch, H * W), A, B, C, D, None, delta_bias,
                                       bool(delta_softplus), False)
            return reference.cross_merge(ys.view(Bsz, 4, Ch, H * W), H, W)
        out, _ = torch.ops.metaformer_zoo.selective_scan_fwd(x, delta, A, B, C, D, None, delta_bias,
                                                             bool(delta_softplus), True)
        return out


def selective_scan2d_tokens(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, backend="auto",
                            dt_proj=None):
    """``selective_scan2d`` in the layout a token mixer has at hand: u channels-last (B, H, W, C); delta (B, 4, H*W,
    C), B and C (B, 4, H*W, N) in MAP order (route r's value at each row-major position, i.e. a per-token projection
    of u, never cross-scanned); A (4*C, N); D, delta_bias (4*C,). Returns y (B, H, W, C) in u's dtype, equal to
    ``selective_scan2d`` on the channels-first, route-order view of the same values. The C kernel reads this layout
    directly (strided: slices of one projection need no copy); other backends get the route-order tensors.

    ``dt_proj`` (4, C, R): Mamba's per-route dt projection. Then ``delta`` is its low-rank input (B, 4, H*W, R) and
    the delta is ``einsum("brlj,rcj->brlc", delta, dt_proj)``; the C kernel forms it at each step, so the (B, 4,
    H*W, C) tensor is never written (the other backends compute it first)."""
    be = resolve_backend(backend, u, delta, A, B, C, D, delta_bias, dt_proj, op=OP)
    if dt_proj is not None:
        if u.dim() != 4 or dt_proj.dim() != 3 or tuple(dt_proj.shape[:2]) != (4, u.shape[-1]) or delta.dim() != 4 \
                or tuple(delta.shape[:3]) != (u.shape[0], 4, u.shape[1] * u.shape[2]) \
                or delta.shape[3] != dt_proj.shape[2]:
            raise ValueError(f"selective_scan2d_tokens: with dt_proj (4, C, R), delta must be its low-rank input "
                             f"(B, 4, H*W, R); got u {list(u.shape)}, delta {list(delta.shape)} and dt_proj "
                             f"{list(dt_proj.shape)}")
        if be != "cpu" or _empty_input(u, A):
            return selective_scan2d_tokens(u, torch.einsum("brlj,rcj->brlc", delta, dt_proj), A, B, C, D,
                                           delta_bias, delta_softplus, backend=be)
        _check_2d_params("selective_scan2d_tokens", u.shape[0], u.shape[-1], delta.shape[2], None, A, B, C, D,
                         delta_bias, map_order=True)
    else:
        _check_2d(u, delta, A, B, C, D, delta_bias, map_order=True)
    Bsz, H, W, Ch = u.shape

    def routed():
        full = delta if dt_proj is None else torch.einsum("brlj,rcj->brlc", delta, dt_proj)
        routes = lambda t: reference.map_to_routes(t.transpose(-1, -2), H, W)  # noqa: E731
        y = selective_scan2d(u.permute(0, 3, 1, 2), routes(full), A, routes(B), routes(C), D, delta_bias,
                             delta_softplus, backend="reference" if be == "cpu" else be)
        return y.permute(0, 2, 3, 1)

    if be != "cpu" or _empty_input(u, A):
        return routed()

    def kernel():
        with no_autocast(u.device.type):
            y, _ = cpu.scan_tokens(u.reshape(Bsz, H * W, Ch), delta, A, B, C, D, delta_bias, delta_softplus, 4, 1,
                                   H, W, dt_proj=dt_proj)
        return y.view(Bsz, H, W, Ch).to(u.dtype)

    return run_kernel(OP, _key(u, delta, B), kernel, routed, kind="CPU")


def selective_scan_tokens(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto",
                          dt_proj=None):
    """``selective_scan`` in the token-major layout: u and delta (batch, L, dim) (channels innermost), A (dim, N),
    B / C (batch, G, L, N) grouped (dim % G == 0; channel c uses group c // (dim / G)); D, delta_bias (dim,).
    Returns y (batch, L, dim) in u's dtype, equal to ``selective_scan`` on the transposed (batch, dim, L) values.
    The C kernel reads this layout directly (strided views need no copy); other backends get the transposes.

    ``dt_proj`` (Gd, dim / Gd, R): a grouped dt projection (channel c's delta is the rank-R input of its group
    c // (dim / Gd) times ``dt_proj[group, c % (dim / Gd)]``; Gd = 1 is Mamba's ``dt_proj``). Then ``delta`` is that
    input, (batch, L, Gd, R); the C kernel forms the delta per step (never materialized), the other backends first."""
    be = resolve_backend(backend, u, delta, A, B, C, D, delta_bias, dt_proj, op=OP)
    if dt_proj is not None:
        if u.dim() != 3 or dt_proj.dim() != 3 or dt_proj.shape[0] * dt_proj.shape[1] != u.shape[-1] \
                or delta.dim() != 4 or tuple(delta.shape) != (u.shape[0], u.shape[1], dt_proj.shape[0],
                                                              dt_proj.shape[2]):
            raise ValueError(f"selective_scan_tokens: with dt_proj (Gd, dim / Gd, R), delta must be its low-rank input "
                             f"(batch, L, Gd, R); got u {list(u.shape)}, delta {list(delta.shape)} and dt_proj "
                             f"{list(dt_proj.shape)}")
        full = lambda: torch.einsum("blgj,gcj->blgc", delta, dt_proj).reshape(u.shape)  # noqa: E731
        if be != "cpu" or _empty_input(u, A):
            return selective_scan_tokens(u, full(), A, B, C, D, delta_bias, delta_softplus, backend=be)
    if u.dim() != 3 or (dt_proj is None and tuple(delta.shape) != tuple(u.shape)):
        raise ValueError(f"selective_scan_tokens: u and delta must both be (batch, L, dim), got {list(u.shape)} and "
                         f"{list(delta.shape)}")
    Bsz, L, Dm = u.shape
    if B.dim() != 4 or tuple(B.shape) != tuple(C.shape) or B.shape[0] != Bsz or B.shape[2] != L \
            or Dm % B.shape[1] != 0 or B.shape[3] != A.shape[-1]:
        raise ValueError(f"selective_scan_tokens: B and C must be (batch, G, L, N)=({Bsz}, G, {L}, {A.shape[-1]}) with "
                         f"dim={Dm} divisible by G, got {list(B.shape)} and {list(C.shape)}")

    def transposed():
        d = delta if dt_proj is None else full()
        y = selective_scan(u.transpose(1, 2), d.transpose(1, 2), A, B.transpose(-1, -2), C.transpose(-1, -2), D,
                           None, delta_bias, delta_softplus, backend="reference" if be == "cpu" else be)
        return y.transpose(1, 2)

    if be != "cpu" or _empty_input(u, A):
        return transposed()
    reference._check_scan_args(u.transpose(1, 2), None if dt_proj is not None else delta.transpose(1, 2), A,
                               B.transpose(-1, -2), C.transpose(-1, -2), D, None, delta_bias)

    def kernel():
        low, w = delta, None
        if dt_proj is not None:  # the grouped projection as one block-diagonal (dim, Gd * R) weight for the kernel
            Gd, cg, R = dt_proj.shape
            eye = torch.eye(Gd, dtype=dt_proj.dtype, device=dt_proj.device)
            w = (dt_proj.unsqueeze(2) * eye[:, None, :, None]).reshape(1, Gd * cg, Gd * R)
            low = delta.reshape(Bsz, L, Gd * R)
        with no_autocast(u.device.type):
            y, _ = cpu.scan_tokens(u, low.unsqueeze(1), A, B, C, D, delta_bias, delta_softplus, 1, B.shape[1], 1, L,
                                   dt_proj=w)
        return y.to(u.dtype)

    return run_kernel(OP, _key(u, delta, B), kernel, transposed, kind="CPU")

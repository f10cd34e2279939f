"""``strip_mix``: dense mixing along H or W within channel groups (RaftMLP rafts, Strip-MLP strips).

Public entry point::

    strip_mix(x, weight, bias=None, axis="h", raft_size=1, backend="auto") -> Tensor

* ``x`` (B, C, H, W) any strides (channels-last and non-contiguous views are read in place by the Triton kernel);
* ``weight`` (G, r_out * L, raft_size * L, K), ``bias`` (G, r_out * L) or None; ``L`` = size of ``x`` along ``axis``;
* returns (B, r_out * C / raft_size, H, W), contiguous NCHW.

Exact formula in :mod:`.reference`. Users:

* RaftMLP vertical token MLP: ``strip_mix(ln(x), fc1.view(1, 2rH, rH, 1), b1, "h", r)`` -> GELU ->
  ``strip_mix(h, fc2.view(1, rH, 2rH, 1), b2, "h", 2r)``; horizontal: the same with ``axis="w"``.
* Strip-MLP ``proj_h`` (dense W x W mix along W over 3 adjacent rows, one matrix per channel group ``c % G``):
  ``strip_mix(x, proj_h.weight.view(G, W, W, 3), proj_h.bias.view(G, W), "w", 1)``; ``proj_w`` is ``axis="h"``.

Dispatch: ``backend`` ("auto" | "reference" | "triton", or env ``METAFORMER_ZOO_KERNELS``) is resolved by
``metaformer_zoo.kernels.resolve_backend``: the PyTorch reference by default (Triton under ``TRITON_INTERPRET=1``, or on
CUDA once the op is GPU-verified); a Triton kernel that fails to compile or launch warns once and falls back. Either way the call is one ``torch.ops.metaformer_zoo.strip_mix`` custom op (with a fake/meta
implementation and a registered autograd formula whose backward is the ``metaformer_zoo.strip_mix_backward`` op), so
``torch.compile`` and ``torch.fx`` see a single node. Under autocast the op runs in the autocast dtype (it is a
matmul); gradients come back in the dtypes of the inputs.
"""
from typing import Optional, Tuple

import torch

from .. import autocast_dtype, resolve_backend, run_kernel, shape_key
from .reference import check_args, strip_mix_backward_reference, strip_mix_reference

__all__ = ["strip_mix", "strip_mix_reference"]


def _out_shape(x, weight, axis, raft_size):
    B, C, H, W = x.shape
    L = H if axis == "h" else W
    r_out = weight.shape[1] // L
    return (B, r_out * (C // raft_size), H, W)


@torch.library.custom_op("metaformer_zoo::strip_mix", mutates_args=())
def _strip_mix_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], axis: str, raft_size: int,
                  backend: str) -> torch.Tensor:
    def ref():
        return strip_mix_reference(x, weight, bias, axis, raft_size).contiguous()

    if backend == "triton":  # a failing kernel warns once and falls back to the reference
        return run_kernel("strip_mix", shape_key(x, weight), lambda: _triton_fwd(x, weight, bias, axis, raft_size), ref)
    return ref()


def _triton_fwd(x, weight, bias, axis, raft_size):
    from .triton import strip_mix_fwd_triton
    return strip_mix_fwd_triton(x, weight, bias, axis, raft_size)


def _triton_bwd(grad_out, x, weight, has_bias, axis, raft_size):
    from .triton import strip_mix_bwd_triton
    return strip_mix_bwd_triton(grad_out, x, weight, has_bias, axis, raft_size)


@_strip_mix_op.register_fake
def _(x, weight, bias, axis, raft_size, backend):
    return x.new_empty(_out_shape(x, weight, axis, raft_size))


@torch.library.custom_op("metaformer_zoo::strip_mix_backward", mutates_args=())
def _strip_mix_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, axis: str,
                           raft_size: int, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    G, Fo = weight.shape[:2]
    args = (grad_out, x, weight, has_bias, axis, raft_size)
    if backend == "triton":
        dx, dw, db = run_kernel("strip_mix", shape_key(x, weight), lambda: _triton_bwd(*args),
                                lambda: strip_mix_backward_reference(*args))
    else:
        dx, dw, db = strip_mix_backward_reference(*args)
    if db is None:
        db = weight.new_zeros(G, Fo)
    return dx.contiguous(), dw.contiguous(), db.contiguous()


@_strip_mix_backward_op.register_fake
def _(grad_out, x, weight, has_bias, axis, raft_size, backend):
    G, Fo = weight.shape[:2]
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((G, Fo))


def _setup_context(ctx, inputs, output):
    x, weight, bias, axis, raft_size, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.axis, ctx.raft_size, ctx.backend = axis, raft_size, backend


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    dx, dw, db = torch.ops.metaformer_zoo.strip_mix_backward(
        grad_out, x, weight, ctx.has_bias, ctx.axis, ctx.raft_size, ctx.backend)
    return dx, dw, (db if ctx.has_bias else None), None, None, None


_strip_mix_op.register_autograd(_backward, setup_context=_setup_context)


def _notrace(fn):
    """Keep the wrapper a leaf for timm's FX feature extraction (its shape checks are Python control flow)."""
    try:
        from timm.models import register_notrace_function
        return register_notrace_function(fn)
    except Exception:  # noqa: BLE001 - timm is optional for the kernel itself
        return fn


@_notrace
def strip_mix(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, axis: str = "h",
              raft_size: int = 1, backend: str = "auto") -> torch.Tensor:
    """Mix ``x`` densely along ``axis`` within channel groups; see the package docstring for shapes and users."""
    check_args(x, weight, bias, axis, raft_size)
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    else:
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    resolved = resolve_backend(backend, x, weight, bias, op="strip_mix")
    return torch.ops.metaformer_zoo.strip_mix(x, weight, bias, axis, int(raft_size), resolved)


def _register_flops():
    """FlopCounterMode formula (as for a matmul: 2 * outputs * reduction length), so ``count_macs`` sees the op."""
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # pragma: no cover - old torch
        return

    @register_flop_formula(torch.ops.metaformer_zoo.strip_mix)
    def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
        G, Fo, Fi, K = w_shape
        n_out = 1
        for s in out_shape:
            n_out *= s
        return 2 * n_out * Fi * K  # every output element is a dot product of length raft_size * L * K

    @register_flop_formula(torch.ops.metaformer_zoo.strip_mix_backward)
    def _flops_bwd(g_shape, x_shape, w_shape, *args, out_shape=None, **kwargs):
        G, Fo, Fi, K = w_shape
        n_g = 1
        for s in g_shape:
            n_g *= s
        return 2 * (2 * n_g * Fi * K)  # dx and dweight, each as large as the forward


_register_flops()

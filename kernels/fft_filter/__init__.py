"""``fft_filter``: AFFNet's adaptive frequency filter as one op (``metaformer_zoo::fft_filter``).

``fft_filter(x, w1, b1, w2, b2, num_groups=8, sparsity_threshold=0.01, act="silu", backend="auto")`` returns
``irfft2(softshrink(MLP(X)) * X, s=(H, W))`` with ``X = rfft2(x, norm="ortho")`` and the complex block-diagonal
2-layer MLP of ``w1`` (2, G, bs, hidden) / ``b1`` (2, G, hidden) / ``w2`` (2, G, hidden, bs) / ``b2`` (2, G, bs) in
the official AFNO layout (see ``reference.py``). The residual is not included. The math is float32 (float64 for
float64 inputs, reference backend only) with autocast disabled; the result has x's dtype and is NCHW-contiguous.

Dispatch: ``metaformer_zoo.kernels.resolve_backend(..., op="fft_filter")``: the plain PyTorch reference by default
(Triton under ``TRITON_INTERPRET=1``, or on CUDA once the op is GPU-verified); ``backend=`` or
``METAFORMER_ZOO_KERNELS`` force one. A Triton kernel that fails to compile or launch warns once and falls back to the
reference (``metaformer_zoo.kernels.run_kernel``).

The op is registered with ``torch.library.custom_op`` (forward and backward are both custom ops with fake
implementations and an autograd formula), so ``torch.compile`` / ``torch.fx`` see a single node and do not break the
graph. A FlopCounterMode formula counts the filter MLP's matmul MACs (8 real products per bin, as the official
einsums); FFTs are not counted, as FlopCounterMode never counts them.

Backward: with the Triton backend, maps that fit one tile use a fused Triton backward kernel (recompute of the
forward in registers + transposed DFT/MLP products, per-(batch, group) partial weight grads summed in PyTorch);
larger maps use a recompute-based backward (torch.fft + the reference spectral formula under autograd). The
reference backend's backward is the analytic adjoint in ``reference.fft_filter_reference_backward`` (autograd does
not record inside a custom op), checked against autograd through ``fft_filter_reference`` in float64.
"""
from typing import Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import no_autocast, resolve_backend, run_kernel, shape_key
from .reference import ACTS, fft_filter_reference, fft_filter_reference_backward

__all__ = ["fft_filter", "fft_filter_reference", "FFTFilterFunction", "check_args"]

_ACT_ALIASES = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu", "identity": "identity",
                "none": "identity"}


def check_args(x, w1, b1, w2, b2, num_groups: int, act: str) -> str:
    """Validate shapes; return the canonical activation name."""
    if x.dim() != 4:
        raise ValueError(f"fft_filter expects x of shape (B, C, H, W), got {list(x.shape)}")
    C = x.shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"fft_filter: channels ({C}) must be divisible by num_groups ({num_groups})")
    bs = C // num_groups
    hid = w1.shape[-1] if w1.dim() == 4 else -1
    want = {"w1": (2, num_groups, bs, hid), "b1": (2, num_groups, hid), "w2": (2, num_groups, hid, bs),
            "b2": (2, num_groups, bs)}
    for name, t in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"fft_filter: {name} has shape {tuple(t.shape)}, expected {want[name]} for x with "
                             f"{C} channels and num_groups={num_groups} (official AFNO layout (2, G, in, out))")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"fft_filter: empty spatial size {tuple(x.shape[-2:])}")
    key = str(act).lower()
    if key not in _ACT_ALIASES:
        raise ValueError(f"fft_filter: unknown activation {act!r}; choose one of {ACTS} (or 'swish')")
    return _ACT_ALIASES[key]


# ------------------------------------------------------------------------------------------------------------------
# implementations (no autograd inside)

def _resolve(backend, *tensors):
    backend = resolve_backend(backend, *tensors, op="fft_filter")
    if backend == "triton" and tensors[0].dtype == torch.float64:
        backend = "reference"  # float64 stays the oracle's business; the kernels are float32
    return backend


def _reference_fwd(x, w1, b1, w2, b2, num_groups, lam, act):
    with torch.no_grad():
        return fft_filter_reference(x, w1, b1, w2, b2, num_groups, lam, act).contiguous()


def _reference_bwd(grad, x, w1, b1, w2, b2, num_groups, lam, act):
    grads = fft_filter_reference_backward(grad, x, w1, b1, w2, b2, num_groups, lam, act)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (x, w1, b1, w2, b2)))


def _triton_fwd(x, w1, b1, w2, b2, num_groups, lam, act):
    from .triton import fft_filter_fwd
    return fft_filter_fwd(x, w1, b1, w2, b2, num_groups, lam, act)


def _triton_bwd(grad, x, w1, b1, w2, b2, num_groups, lam, act):
    from .triton import fft_filter_bwd
    return tuple(fft_filter_bwd(grad, x, w1, b1, w2, b2, num_groups, lam, act))


def _forward_impl(x, w1, b1, w2, b2, num_groups, lam, act, backend):
    args = (x, w1, b1, w2, b2, num_groups, lam, act)
    if _resolve(backend, x, w1, b1, w2, b2) == "triton":  # a failing kernel warns once and falls back
        return run_kernel("fft_filter", shape_key(x, w1), lambda: _triton_fwd(*args), lambda: _reference_fwd(*args))
    return _reference_fwd(*args)


def _backward_impl(grad, x, w1, b1, w2, b2, num_groups, lam, act, backend):
    args = (grad, x, w1, b1, w2, b2, num_groups, lam, act)
    if _resolve(backend, x, w1, b1, w2, b2) == "triton":
        return run_kernel("fft_filter", shape_key(x, w1), lambda: _triton_bwd(*args), lambda: _reference_bwd(*args))
    return _reference_bwd(*args)


# ------------------------------------------------------------------------------------------------------------------
# torch.library custom ops

@torch.library.custom_op("metaformer_zoo::fft_filter", mutates_args=())
def _fft_filter_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                   num_groups: int, sparsity_threshold: float, act: str, backend: str) -> torch.Tensor:
    with no_autocast(x.device.type):
        return _forward_impl(x, w1, b1, w2, b2, num_groups, sparsity_threshold, act, backend)


@_fft_filter_op.register_fake
def _(x, w1, b1, w2, b2, num_groups, sparsity_threshold, act, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("metaformer_zoo::fft_filter_backward", mutates_args=())
def _fft_filter_backward_op(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                            w2: torch.Tensor, b2: torch.Tensor, num_groups: int, sparsity_threshold: float,
                            act: str, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    with no_autocast(x.device.type):
        return _backward_impl(grad, x, w1, b1, w2, b2, num_groups, sparsity_threshold, act, backend)


@_fft_filter_backward_op.register_fake
def _(grad, x, w1, b1, w2, b2, num_groups, sparsity_threshold, act, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (x, w1, b1, w2, b2))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, num_groups, lam, act, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)
    ctx.args = (num_groups, lam, act, backend)


def _backward(ctx, grad):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    grads = torch.ops.metaformer_zoo.fft_filter_backward(grad.contiguous(), x, w1, b1, w2, b2, *ctx.args)
    return tuple(grads) + (None, None, None, None)


_fft_filter_op.register_autograd(_backward, setup_context=_setup_context)


def _filter_macs(x_shape, w1_shape) -> int:
    B, C, H, W = x_shape
    return 8 * B * H * (W // 2 + 1) * C * w1_shape[-1]


@register_flop_formula(torch.ops.metaformer_zoo.fft_filter)
def _fft_filter_flops(x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    """2 x the MACs of the 8 real block-diagonal products of the filter MLP (FFTs are not counted)."""
    return 2 * _filter_macs(x_shape, w1_shape)


@register_flop_formula(torch.ops.metaformer_zoo.fft_filter_backward)
def _fft_filter_backward_flops(grad_shape, x_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * _filter_macs(x_shape, w1_shape)


# ------------------------------------------------------------------------------------------------------------------
# public API

def fft_filter(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               num_groups: int = 8, sparsity_threshold: float = 0.01, act: str = "silu",
               backend: str = "auto") -> torch.Tensor:
    """AFF filter ``irfft2(softshrink(MLP(rfft2(x))) * rfft2(x))`` (no residual); see the module docstring."""
    act = check_args(x, w1, b1, w2, b2, num_groups, act)
    backend = _resolve(backend, x, w1, b1, w2, b2)
    if backend == "reference" and not torch.compiler.is_compiling():
        # eager on the reference path: the plain PyTorch ops under autograd, which keeps the forward's
        # intermediates for the backward as the official code does (the custom op's analytic backward recomputes
        # the filter MLP: measured ~5 % of an AFFNet train step on CPU); compiled graphs get the one custom op
        return fft_filter_reference(x, w1, b1, w2, b2, int(num_groups), float(sparsity_threshold), act)
    return torch.ops.metaformer_zoo.fft_filter(x, w1, b1, w2, b2, int(num_groups), float(sparsity_threshold), act,
                                               backend)


class FFTFilterFunction(torch.autograd.Function):
    """The same op as an ``autograd.Function`` (eager only; ``fft_filter`` uses the custom op)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, num_groups=8, sparsity_threshold=0.01, act="silu", backend="auto"):
        act = check_args(x, w1, b1, w2, b2, num_groups, act)
        backend = _resolve(backend, x, w1, b1, w2, b2)
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.args = (num_groups, float(sparsity_threshold), act, backend)
        return _forward_impl(x, w1, b1, w2, b2, *ctx.args)

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        grads = _backward_impl(grad.contiguous(), x, w1, b1, w2, b2, *ctx.args)
        return tuple(grads) + (None, None, None, None)

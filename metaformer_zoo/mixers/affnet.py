"""AFF token mixer (Adaptive Frequency Filters, AFFNet, ICCV 2023; microsoft/TokenMixers ``AFNO2D_channelfirst``).

``x + irfft2(softshrink(MLP(X)) * X)`` with ``X = rfft2(x, norm="ortho")``: an instance-adaptive frequency mask
produced by a complex block-diagonal (``num_groups`` blocks) 2-layer channel MLP from the spectrum itself, applied to
the same spectrum. The filter runs in float32 with autocast disabled (as the official code) through the
``metaformer_zoo.kernels.fft_filter`` op (Triton on CUDA, PyTorch reference elsewhere).

Registered as ``"aff"``: ``timm.create_model("zoo_metaformer", token_mixers=["pooling", "aff", "aff", "attention"])``.
``inner_skip=True`` (default) keeps the official mixer's own residual (``return x + filter``); inside a
``MetaFormerBlock`` (which adds its own residual) set ``mixer_kwargs=dict(inner_skip=False)`` for a pure filter.
"""
import torch
import torch.nn as nn
from timm.models import register_notrace_function

from ..kernels.fft_filter import fft_filter  # also registers torch.ops.metaformer_zoo.fft_filter
from . import register_mixer

__all__ = ["AFFMixer", "aff_filter"]


@register_notrace_function
def aff_filter(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               num_groups: int, sparsity_threshold: float, act: str, backend: str) -> torch.Tensor:
    """The ``fft_filter`` op; a leaf for FX that stays scriptable after tracing (timm's FX -> TorchScript path).

    Eager: ``metaformer_zoo.kernels.fft_filter`` (argument checks, backend dispatch). TorchScript: the registered op
    ``torch.ops.metaformer_zoo.fft_filter`` itself, which resolves ``backend`` the same way.
    """
    if torch.jit.is_scripting():
        return torch.ops.metaformer_zoo.fft_filter(x, w1, b1, w2, b2, num_groups, sparsity_threshold, act, backend)
    return fft_filter(x, w1, b1, w2, b2, num_groups=num_groups, sparsity_threshold=sparsity_threshold, act=act,
                      backend=backend)


@register_mixer("aff")
class AFFMixer(nn.Module):
    """Adaptive frequency filter token mixer; parameter names/shapes as the official ``AFNO2D_channelfirst``.

    Args:
        dim: channels (divisible by ``num_groups``).
        num_groups: blocks of the block-diagonal complex MLP (official: 8).
        sparsity_threshold: softshrink lambda on the mask (official: 0.01).
        act_layer: activation between the two complex layers, applied to real and imaginary parts
            (official: the model's global activation; ``"silu"`` = cvnets swish, the zoo default).
        hidden_size_factor: hidden width of the filter MLP relative to the block size (official: 1).
        inner_skip: return ``x + filter(x)`` (official) or only ``filter(x)``.
        backend: kernel backend, ``"auto"`` | ``"triton"`` | ``"reference"``.
    """

    def __init__(self, dim: int, num_groups: int = 8, sparsity_threshold: float = 0.01, act_layer: str = "silu",
                 hidden_size_factor: int = 1, inner_skip: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_groups != 0:
            raise ValueError(f"AFF mixer: dim ({dim}) must be divisible by num_groups ({num_groups})")
        if not isinstance(act_layer, str):
            raise ValueError(f"AFF mixer: act_layer must be a name ('silu', 'relu', 'gelu'), got {act_layer!r}")
        self.dim = dim
        self.num_groups = num_groups
        self.block_size = dim // num_groups
        self.sparsity_threshold = float(sparsity_threshold)
        self.act = act_layer.lower()
        self.inner_skip = inner_skip
        self.backend = backend
        bs, hid = self.block_size, self.block_size * hidden_size_factor
        self.w1 = nn.Parameter(0.02 * torch.randn(2, num_groups, bs, hid))
        self.b1 = nn.Parameter(0.02 * torch.randn(2, num_groups, hid))
        self.w2 = nn.Parameter(0.02 * torch.randn(2, num_groups, hid, bs))
        self.b2 = nn.Parameter(0.02 * torch.randn(2, num_groups, bs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = aff_filter(x, self.w1, self.b1, self.w2, self.b2, self.num_groups, self.sparsity_threshold, self.act,
                       self.backend)
        return x + y if self.inner_skip else y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_groups={self.num_groups}, sparsity_threshold={self.sparsity_threshold}, "
                f"act={self.act}, inner_skip={self.inner_skip}")

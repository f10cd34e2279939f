"""The MetaFormer baseline token mixers (identity, pooling, separable conv, attention, random mixing).

All operate on (B, C, H, W). Parameter names follow the official sail-sg/metaformer code (and timm), so the official
checkpoints load after the key remapping in each family's ``checkpoint_filter_fn``.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_notrace_module
from timm.models.metaformer import Pooling, SepConv

from . import register_mixer


@register_mixer("identity")
class IdentityMixer(nn.Identity):
    """IdentityFormer's mixer. Note the block still adds ``norm1(x)`` to the residual: the branch is not skipped."""

    def __init__(self, dim: int, **kwargs):
        super().__init__()


register_mixer("pooling", Pooling)  # avgpool(3, s1, count_include_pad=False)(x) - x
register_mixer("sepconv", SepConv)  # pw(2C) -> StarReLU -> dw7x7 -> pw(C), no bias


@register_mixer("attention")
class Attention2d(nn.Module):
    """Global multi-head self-attention (CAFormer): head_dim 32, no qkv/proj bias, no positional information.

    Applied to a (B, C, H, W) map by flattening the H*W tokens (row-major), as the official NHWC code does. Keys
    (``qkv``, ``proj``) match the official code and timm's ``Attention``.
    """

    def __init__(self, dim: int, head_dim: int = 32, num_heads: Optional[int] = None, qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., proj_bias: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = max(1, num_heads if num_heads else dim // head_dim)
        self.attention_dim = self.num_heads * head_dim
        self.qkv = nn.Linear(dim, self.attention_dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(self.attention_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        qkv = self.qkv(x.flatten(2).transpose(1, 2)).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, N, self.attention_dim)))
        return y.transpose(1, 2).reshape(B, C, H, W)


@register_notrace_module
@register_mixer("random")
class RandomMixing(nn.Module):
    """RandFormer's frozen random token mixing: ``y[m] = sum_n R[m, n] x[n]`` over the H*W tokens.

    ``R`` (``random_matrix``, shape (N, N)) is row-softmaxed uniform noise, frozen: a persistent buffer (the official
    code keeps it as a ``requires_grad=False`` parameter; the state-dict key is the same, so official checkpoints load
    strictly), so pretrained weights are needed to reproduce a trained model. It is listed in ``frozen_buffers``:
    ``metaformer_zoo.zoo.count_params`` counts it in the total, as the official parameter count does. The official
    model only runs at the token count it was built for (196 / 49 tokens in stages 3 / 4 at 224 px). Here:

    * at the built size the op is exactly the official one;
    * at any other size a clear error is raised, unless ``resize=True``: then R, viewed as a (h, w) -> (h, w) map, is
      resampled bilinearly in both its output and input grids to the new (H, W) and its rows renormalised to sum to 1
      (a documented zoo extension for dense prediction; outputs at other sizes are not the official model's).
    """

    frozen_buffers = ("random_matrix",)

    def __init__(self, dim: int, feat_size: Tuple[int, int] = (14, 14), resize: bool = False, **kwargs):
        super().__init__()
        self.feat_size = tuple(feat_size)
        self.resize = resize
        num_tokens = self.feat_size[0] * self.feat_size[1]
        self.register_buffer("random_matrix", torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1))

    def _matrix_for(self, H: int, W: int) -> torch.Tensor:
        h, w = self.feat_size
        if (H, W) == (h, w):
            return self.random_matrix
        if not self.resize:
            raise ValueError(
                f"RandomMixing was built for a {h}x{w} token grid ({h * w} tokens) but got {H}x{W}. RandFormer's frozen "
                f"mixing matrices fix the input size (224x224 for the official weights; 211-226 px square also work). "
                f"Resize the input, build the model with img_size matching your input, or pass "
                f"random_mixing_resize=True to resample the matrices (not the official model at other sizes)."
            )
        m = self.random_matrix.reshape(h * w, 1, h, w)  # rows: output token, map over input tokens
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False).reshape(h, w, H * W)
        m = m.permute(2, 0, 1).unsqueeze(1)  # (new input tokens, 1, h_out, w_out)
        m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False).reshape(H * W, H * W).t()
        m = m.clamp_min(0)
        return m / m.sum(dim=-1, keepdim=True)

    def forward(self, x):
        B, C, H, W = x.shape
        r = self._matrix_for(H, W).to(x.dtype)
        y = torch.einsum("mn,bcn->bcm", r, x.reshape(B, C, H * W))
        return y.reshape(B, C, H, W)

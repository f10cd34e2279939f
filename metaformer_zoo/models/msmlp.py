"""MS-MLP: Mix-Shift-MLP (Zheng, He, Chen, Zhou: "Mixing and Shifting: Exploiting Global and Local Dependencies in
Vision MLPs", arXiv 2202.06510; official code https://github.com/JegZheng/MS-MLP, ``models/ms_mlp.py``).

Architecture (as the official code, checked against it):

* stem ``PatchEmbed``: conv 4x4 s4 (bias) -> channel LayerNorm (eps 1e-6, with bias);
* 4 stages of ``MixShiftBlock``; between stages a ``PatchEmbed(patch 2)``: conv 2x2 s2 C -> 2C **then** LN (the
  official code runs it at the end of stage i, here it opens stage i + 1: same order of operations);
* block (one residual, no norm before token mixing)::

      y = mix_shift(x)                      # metaformer_zoo.mixers.msmlp.MixShift ("mixshift")
      x = x + drop_path(gamma * fc2(GELU(fc1(LN(y)))))   # LN/MLP in NHWC as the official nn.Linear layers

  gamma (layer scale) starts at 1e-6, LN eps 1e-6;
* head: global average pool -> LayerNorm(8C, eps 1e-6) -> Linear (the norm comes after pooling).

Resolution: every weight is resolution-agnostic. The official ``PatchEmbed`` asserts the input size equals
``img_size`` (also in every downsampling layer); here H and W are read from the tensor, so the model runs at any size
>= 32 (224, 256, 224x320, 800x1216 ...) with stage strides 4/8/16/32 (sizes not divisible by 32 are floored by the
strided convs, as in the official model rebuilt with ``img_size`` = that size).

Official checkpoints (``msmlp_*_patch4_ckpt_epoch299.pth``) are Swin-style training dicts (``model``, ``optimizer``,
``lr_scheduler``, ``max_accuracy``, ``epoch``, ``config``) whose ``config`` is a pickled yacs ``CfgNode``. Every
loading path reads them safely (``metaformer_zoo.checkpoint``; ``load_official_checkpoint`` here) and converts them
with ``checkpoint_filter_fn``: ``pretrained=True`` (URL or ``pretrained_cfg_overlay=dict(file=...)``),
``checkpoint_path=``, ``tools/convert.py``, ``hubconf`` and the dense ``init_cfg``.
"""
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ..builder import build_zoo_model
from ..checkpoint import CheckpointError, load_checkpoint_file, unwrap_state_dict, validate_state_dict
from ..mixers.msmlp import MIX_SIZES, SHIFT_DIST, MixShift
from ..skeleton import MetaFormerBase, MetaFormerHead, MetaFormerStage, drop_path_rates, to_stage_list
from ..zoo import register_family

__all__ = ["MSMLP", "MixShiftBlock", "checkpoint_filter_fn", "official_state_dict", "load_official_checkpoint",
           "DENSE_OUT_NORMS", "dense_out_norm"]

# Dense prediction: the official repo has no detection/segmentation code, and its stage outputs carry no norm.
# The zoo's dense adapters put one channel LayerNorm (eps 1e-6, like every MS-MLP norm) on each of the 4 outputs
# (strides 4/8/16/32), as Swin/ConvNeXt-style hierarchical backbones do: norm names per output index.
DENSE_OUT_NORMS: Tuple[str, ...] = ("layernorm2d", "layernorm2d", "layernorm2d", "layernorm2d")


def dense_out_norm(index: int, num_chs: int) -> nn.Module:
    """The norm the dense adapter puts on output ``index`` (channel LN with bias, eps 1e-6, NCHW)."""
    if DENSE_OUT_NORMS[index] != "layernorm2d":
        raise ValueError(f"no dense norm defined for output {index}")
    return LayerNorm2d(num_chs, eps=1e-6)


class PatchEmbed2d(nn.Module):
    """Non-overlapping patch conv (kernel = stride = ``patch_size``, bias) then channel LayerNorm (eps 1e-6).

    The official ``PatchEmbed`` (stem and downsampling) without its ``img_size`` assert.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm2d(embed_dim, eps=1e-6)

    def forward(self, x):
        return self.norm(self.proj(x))


class MixShiftBlock(nn.Module):
    """``x + drop_path(gamma * MLP(LN(mix_shift(x))))``: the official ``MixShiftBlock`` (one residual branch).

    Keys: ``token_mixer.dwconv_{lr,td}.{g}``, ``norm``, ``mlp.fc1``/``mlp.fc2`` (nn.Linear, NHWC), ``gamma``.
    """

    no_weight_decay_keys = ("gamma",)

    def __init__(
            self,
            dim: int,
            shift_groups: int = 5,
            shift_dist: Sequence[int] = SHIFT_DIST,
            mix_size: Sequence[int] = MIX_SIZES[0],
            mlp_ratio: float = 4.,
            drop_path: float = 0.,
            layer_scale_init_value: float = 1e-6,
            proj_drop: float = 0.,
    ):
        super().__init__()
        self.token_mixer = MixShift(dim, shift_groups=shift_groups, shift_dist=shift_dist, mix_size=mix_size)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU, drop=proj_drop)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.token_mixer(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class MSMLP(MetaFormerBase):
    r"""MS-MLP (official ``MS_MLP``) on the zoo's timm interface.

    Args:
        in_chans, num_classes, global_pool: as timm.
        embed_dim: stage-1 width; stage i has ``embed_dim * 2**i`` channels (or give ``dims``).
        depths: blocks per stage.
        shift_groups: channel groups of the mix-shift mixer (official ``SHIFT_SIZE``, a count, not pixels).
        shift_dist: circular shift per group (official ``SHIFT_DIST``).
        mix_size: per stage, the depthwise kernel size per group (official ``MIX_SIZE``); one flat list applies to
            every stage.
        mlp_ratio: channel-MLP expansion.
        layer_scale_init_value: initial gamma (official 1e-6; <= 0 disables gamma).
        patch_size: stem patch size.
        drop_rate: dropout before the classifier (timm convention; the official code has ``pos_drop`` after the stem
            instead; both are 0 in every official config).
        proj_drop_rate: dropout inside the channel MLP (the official block accepts ``drop`` but does not use it).
        drop_path_rate: stochastic depth, linear over all blocks.
        img_size: accepted for compatibility with the official constructor; unused (any input size works).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 96,
            depths: Sequence[int] = (3, 3, 9, 3),
            dims: Optional[Sequence[int]] = None,
            shift_groups: int = 5,
            shift_dist: Sequence[int] = SHIFT_DIST,
            mix_size: Sequence[Sequence[int]] = MIX_SIZES,
            mlp_ratio: float = 4.,
            layer_scale_init_value: float = 1e-6,
            patch_size: int = 4,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            img_size: Union[None, int, Tuple[int, int]] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        dims = list(dims) if dims is not None else [int(embed_dim * 2 ** i) for i in range(num_stages)]
        if len(dims) != num_stages:
            raise ValueError(f"depths has {num_stages} stages but dims has {len(dims)}")
        if all(isinstance(k, int) for k in mix_size):  # one kernel-size list for every stage
            mix_size = [list(mix_size)] * num_stages
        mix_size = to_stage_list([list(m) for m in mix_size], num_stages, "mix_size")
        self.stem = PatchEmbed2d(in_chans, dims[0], patch_size)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages = []
        for i in range(num_stages):
            downsample = PatchEmbed2d(dims[i - 1], dims[i], 2) if i > 0 else None
            blocks = [
                MixShiftBlock(dims[i], shift_groups, shift_dist, mix_size[i], mlp_ratio, dpr[i][j],
                              layer_scale_init_value, proj_drop_rate)
                for j in range(depths[i])
            ]
            stages.append(MetaFormerStage(blocks, downsample))
        self.stages = nn.Sequential(*stages)
        self._init_interface(in_chans, num_classes, dims,
                             reductions=[patch_size * 2 ** i for i in range(num_stages)])
        self.min_input_size = patch_size * 2 ** (num_stages - 1)
        self.input_divisor = 1
        self.head = MetaFormerHead(self.num_features, num_classes, global_pool=global_pool, norm_layer="layernorm2d",
                                   drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # official: trunc_normal(0.02) on Linear layers only, zero bias; convs keep the PyTorch default init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------------
# official checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def load_official_checkpoint(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Read an official MS-MLP checkpoint (or any zoo/timm checkpoint file) without executing arbitrary pickles.

    The official files (Swin-style ``save_checkpoint``) pickle the yacs ``CfgNode`` training config next to the
    weights; plain ``torch.load(weights_only=True)`` rejects them and the official ``weights_only=False`` would run
    whatever the pickle says. They are read by the zoo's one safe reader (``metaformer_zoo.checkpoint.
    load_checkpoint_file``: weights-only with the CfgNode name allow-listed to a plain-dict stand-in, yacs not needed),
    the reader every loading path uses (``pretrained=True``, ``checkpoint_path=``, ``tools/convert.py``, dense).

    Returns the checkpoint object with every config node as a plain ``dict`` (e.g. ``ckpt["config"]["MODEL"]
    ["MSMLP"]["DEPTHS"]``). Raises ``CheckpointError`` naming the file and what it cannot read.
    """
    return load_checkpoint_file(path, map_location=map_location)


def _official_to_zoo_key(k: str) -> str:
    m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
    if m:  # official: downsample at the end of stage i; zoo: at the start of stage i + 1
        return f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    k = re.sub(r"^patch_embed\.", "stem.", k)
    k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.(dwconv_lr|dwconv_td)\.", r"stages.\1.blocks.\2.token_mixer.\3.", k)
    k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1.", k)
    k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2.", k)
    k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.blocks.\2.", k)
    k = re.sub(r"^norm\.", "head.norm.", k)
    k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
    return k


def _zoo_to_official_key(k: str) -> str:
    m = re.match(r"^stages\.(\d+)\.downsample\.(.*)$", k)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    k = re.sub(r"^stem\.", "patch_embed.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.token_mixer\.", r"layers.\1.blocks.\2.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.blocks.\2.pwconv1.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.blocks.\2.pwconv2.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"layers.\1.blocks.\2.", k)
    k = re.sub(r"^head\.norm\.", "norm.", k)
    k = re.sub(r"^head\.fc\.", "head.", k)
    return k


def checkpoint_filter_fn(state_dict, model: MSMLP):
    """Official JegZheng/MS-MLP checkpoint (training dict with ``model``, or a flat state dict) -> zoo, validated.

    Accepts what ``load_official_checkpoint`` returns, a bare official state dict, or zoo-layout weights. Shapes are
    unchanged (the official MLP layers are nn.Linear, as here). Raises ``CheckpointError`` when nothing fits.
    """
    state_dict = unwrap_state_dict(state_dict)
    if "stem.proj.weight" not in state_dict:
        if "patch_embed.proj.weight" not in state_dict:
            sample = ", ".join(sorted(state_dict)[:5])
            raise CheckpointError(
                f"unrecognised checkpoint layout for MS-MLP: expected official JegZheng/MS-MLP keys "
                f"('patch_embed.proj.weight', 'layers.0.blocks.0.dwconv_lr.0.weight', ...) or zoo keys "
                f"('stem.proj.weight'), got {sample} ... Is this a checkpoint of another family?"
            )
        state_dict = {_official_to_zoo_key(k): v for k, v in state_dict.items()}
    return validate_state_dict(state_dict, model, source="checkpoint (JegZheng/MS-MLP layout)")


def official_state_dict(model: MSMLP) -> Dict[str, torch.Tensor]:
    """The model's weights in the official MS-MLP key layout (the inverse of ``checkpoint_filter_fn``)."""
    return {_zoo_to_official_key(k): v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------------
def _cfg(url: str = "", **kwargs):
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875,  # official eval: resize int(256 / 224 * 224) = 256, center crop 224
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.proj", "classifier": "head.fc", "license": "mit",
        "paper_ids": "arXiv:2202.06510",
        "paper_name": "Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs",
        "origin_url": "https://github.com/JegZheng/MS-MLP",
        **kwargs,
    }


def _official_url(size: str) -> str:
    return (f"https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/"
            f"msmlp_{size}_patch4/msmlp_{size}_patch4_ckpt_epoch299.pth")


default_cfgs = generate_default_cfgs({
    "msmlp_tiny.in1k": _cfg(url=_official_url("tiny")),
    "msmlp_small.in1k": _cfg(url=_official_url("small")),
    "msmlp_base.in1k": _cfg(url=_official_url("base")),
})

# name: (embed_dim, depths, drop_path_rate) from configs/msmlp_{tiny,small,base}_patch4_shift5_224.yaml
MODEL_SPECS = {
    "msmlp_tiny": (96, (3, 3, 9, 3), 0.1),
    "msmlp_small": (96, (3, 3, 27, 3), 0.4),
    "msmlp_base": (128, (3, 3, 27, 3), 0.5),
}

register_family(
    "msmlp", list(MODEL_SPECS),
    paper="Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs (arXiv 2202.06510)",
    code="https://github.com/JegZheng/MS-MLP",
    filter_fn=checkpoint_filter_fn, to_official=official_state_dict, official_wrapper="model",
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> MSMLP:
    embed_dim, depths, dpr = MODEL_SPECS[variant]
    model_args = dict(embed_dim=embed_dim, depths=depths, drop_path_rate=dpr)
    return build_zoo_model(MSMLP, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                           **dict(model_args, **kwargs))


@register_model
def msmlp_tiny(pretrained=False, **kwargs) -> MSMLP:
    return _create("msmlp_tiny", pretrained, **kwargs)


@register_model
def msmlp_small(pretrained=False, **kwargs) -> MSMLP:
    return _create("msmlp_small", pretrained, **kwargs)


@register_model
def msmlp_base(pretrained=False, **kwargs) -> MSMLP:
    return _create("msmlp_base", pretrained, **kwargs)

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
loading path reads them with the zoo's one safe reader (``metaformer_zoo.checkpoint.load_checkpoint_file``:
weights-only, the CfgNode allow-listed as a plain-dict stand-in, yacs not needed) and converts them with
``checkpoint_filter_fn``: ``pretrained=True`` (URL or ``pretrained_cfg_overlay=dict(file=...)``), ``checkpoint_path=``,
``tools/convert.py``, ``hubconf`` and the dense ``init_cfg``.

Why not a spec over the skeleton's ``MetaFormer``: the MS-MLP block has one residual branch with no norm before the
token mixer (``x + gamma * MLP(LN(mix_shift(x)))``), and its MLP is NHWC ``nn.Linear`` (keys ``mlp.fc1``/``fc2``),
neither of which ``MetaFormerBlock`` expresses; the model keeps its own block inside the skeleton's
``MetaFormerStage`` / ``MetaFormerBase`` / ``MetaFormerHead`` (features, ``forward_intermediates``, ``group_matcher``
come from ``MetaFormerBase``).
"""
import re
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, Mlp, calculate_drop_path_rates, trunc_normal_

from ..checkpoint import is_official_layout, unwrap_state_dict, validate_state_dict
from ..mixers.msmlp import MIX_SIZES, SHIFT_DIST, MixShift
from ..skeleton import MetaFormerBase, MetaFormerHead, MetaFormerStage, to_stage_list
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family

__all__ = ["MSMLP", "MixShiftBlock", "checkpoint_filter_fn", "official_state_dict", "SPEC"]

class PatchEmbed2d(nn.Module):
    """Non-overlapping patch conv (kernel = stride = ``patch_size``, bias) then channel LayerNorm (eps 1e-6).

    The official ``PatchEmbed`` (stem and downsampling) without its ``img_size`` assert.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = LayerNorm2d(dim, eps=1e-6)

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
        dims: channels per stage (official ``EMBED_DIM`` C gives ``(C, 2C, 4C, 8C)``).
        depths: blocks per stage.
        shift_groups: channel groups of the mix-shift mixer (official ``SHIFT_SIZE``, a count, not pixels).
        shift_dist: circular shift per group (official ``SHIFT_DIST``).
        mix_size: per stage, the depthwise kernel size per group (official ``MIX_SIZE``); one flat list applies to
            every stage.
        mlp_ratios: channel-MLP expansion, one for every stage or one per stage.
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
            depths: Sequence[int] = (3, 3, 9, 3),
            dims: Sequence[int] = (96, 192, 384, 768),
            shift_groups: int = 5,
            shift_dist: Sequence[int] = SHIFT_DIST,
            mix_size: Sequence[Sequence[int]] = MIX_SIZES,
            mlp_ratios: Union[float, Sequence[float]] = 4.,
            layer_scale_init_value: float = 1e-6,
            patch_size: int = 4,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            img_size: Union[None, int, Tuple[int, int]] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        dims = list(dims)
        if len(dims) != num_stages:
            raise ValueError(f"depths has {num_stages} stages but dims has {len(dims)}: give one width per stage")
        mlp_ratios = to_stage_list(mlp_ratios, num_stages, "mlp_ratios")
        if all(isinstance(k, int) for k in mix_size):  # one kernel-size list for every stage
            mix_size = [list(mix_size)] * num_stages
        mix_size = to_stage_list([list(m) for m in mix_size], num_stages, "mix_size")
        self.stem = PatchEmbed2d(in_chans, dims[0], patch_size)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        for i in range(num_stages):
            downsample = PatchEmbed2d(dims[i - 1], dims[i], 2) if i > 0 else None
            blocks = [
                MixShiftBlock(dims[i], shift_groups, shift_dist, mix_size[i], mlp_ratios[i], dpr[i][j],
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

    Accepts what ``metaformer_zoo.checkpoint.load_checkpoint_file`` returns, a bare official state dict, or zoo-layout weights. Shapes are
    unchanged (the official MLP layers are nn.Linear, as here). Raises ``CheckpointError`` when nothing fits.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_official_layout(state_dict, "MS-MLP", "stem.proj.weight",
                          ("patch_embed.proj.weight", "layers.0.blocks.0.dwconv_lr.0.weight"),
                          "official JegZheng/MS-MLP"):
        state_dict = {_official_to_zoo_key(k): v for k, v in state_dict.items()}
    return validate_state_dict(state_dict, model, source="checkpoint (JegZheng/MS-MLP layout)")


def official_state_dict(model: MSMLP) -> Dict[str, torch.Tensor]:
    """The model's weights in the official MS-MLP key layout (the inverse of ``checkpoint_filter_fn``)."""
    return {_zoo_to_official_key(k): v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# family declaration
# ----------------------------------------------------------------------------------------------------------------------
CITATION = """@article{zheng2022mixing,
  title   = {Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs},
  author  = {Zheng, Huangjie and He, Pengcheng and Chen, Weizhu and Zhou, Mingyuan},
  journal = {arXiv preprint arXiv:2202.06510},
  year    = {2022}
}"""


def _official_url(size: str) -> str:
    return (f"https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/"
            f"msmlp_{size}_patch4/msmlp_{size}_patch4_ckpt_epoch299.pth")


_TOP1_SOURCE = "JegZheng/MS-MLP README"

# variants: configs/msmlp_{tiny,small,base}_patch4_shift5_224.yaml (EMBED_DIM C -> dims (C, 2C, 4C, 8C))
SPEC = FamilySpec(
    name="msmlp", model_cls=MSMLP,
    code="https://github.com/JegZheng/MS-MLP",
    license="mit", citation=CITATION,
    # official eval: resize int(256 / 224 * 224) = 256, center crop 224 (the default crop_pct 0.875), bicubic
    cfg=dict(first_conv="stem.proj"),
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict, wrapper="model"),
    # the official repo has no detection/segmentation code and its stage outputs carry no norm: the zoo's dense
    # adapter puts a channel LayerNorm (eps 1e-6, like every MS-MLP norm) on each output, Swin/ConvNeXt style
    dense_out_norms=(dict(type="layernorm2d", eps=1e-6),) * 4,
    recipe="msmlp", card="msmlp",
    notes="Dense out norms are a zoo choice (no official dense code). Official checkpoints are Swin-style training "
          "dicts (weights under 'model', a pickled yacs CfgNode config), read safely by load_checkpoint_file.",
    models=(
        Variant("msmlp_tiny", dict(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), drop_path_rate=0.1),
                params=28_656_232, macs=4_437_768_960, top1=82.1, top1_source=_TOP1_SOURCE,
                tags={"in1k": dict(url=_official_url("tiny"))}),
        Variant("msmlp_small", dict(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), drop_path_rate=0.4),
                params=50_303_752, macs=8_667_135_360, top1=83.4, top1_source=_TOP1_SOURCE,
                tags={"in1k": dict(url=_official_url("small"))}),
        Variant("msmlp_base", dict(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3), drop_path_rate=0.5),
                params=88_696_792, macs=15_334_215_328, top1=83.8, top1_source=_TOP1_SOURCE,
                tags={"in1k": dict(url=_official_url("base"))}),
    ),
)
register_family(SPEC, __name__)

"""AFFNet (Adaptive Frequency Filters as Efficient Global Token Mixers, ICCV 2023; microsoft/TokenMixers).

A MobileViT-style hybrid: conv stem and MobileNetV2 inverted residuals (MV2), then in strides 8/16/32 an "AFF block"
(``n`` Blocks of [norm -> MV2 (own skip) -> norm -> AFF filter (own skip)] inside one residual, a trailing norm,
a 1x1 projection and a 1x1 fusion with the block input), a 1x1 expansion conv and a linear classifier.

Zoo layout (official cvnets key -> zoo key, see ``checkpoint_filter_fn``):

* ``conv_1`` -> ``stem.conv``; ``layer_1.0`` (MV2, stride 1) -> ``stem.mv2``: the stem ends at stride 2.
* ``layer_2.0`` -> ``stages.0.downsample``; ``layer_2.{1,2}`` -> ``stages.0.blocks.{0,1}`` (stride 4).
* ``layer_{3,4,5}.0`` (MV2 stride 2) -> ``stages.{1,2,3}.downsample``; ``layer_{3,4,5}.1`` (AFF block) ->
  ``stages.{1,2,3}.blocks.0`` (strides 8/16/32). In the blocks ``filter`` -> ``token_mixer``.
* ``conv_1x1_exp`` -> ``final_conv`` (part of ``forward_features``, so ``num_features`` = 960/768/576);
  ``classifier.fc`` -> ``head.fc``. Every cvnets ``.block.`` level is dropped (``x.block.conv`` -> ``x.conv``).

``forward_intermediates`` / ``features_only`` return the stage outputs (``out_l2`` .. ``out_l5`` of cvnets, strides
4/8/16/32, NCHW); the 1x1 expansion is only in the final output, as in cvnets segmentation (``use_l5_exp=False``).

Not recoverable from the released code (the yaml configs are missing): the in-block norm and the activation.
Defaults follow reference/mlp_freq.md §1.2: ``block_norm="layer_norm_2d"`` (cvnets LayerNorm2D_NCHW = GroupNorm(1, C)
over (C, H, W), eps 1e-5, the code's fallback) and ``act_layer="silu"`` (cvnets swish, MobileViT-family configs).
Switch with ``block_norm="layer_norm"`` (cvnets channel LN: per pixel over C, ``(x - mean) / (std + eps)``) and
``act_layer="relu"`` (the argparse defaults). Both choices have identical parameter shapes.
"""
import re
from typing import List, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, GroupNorm1, calculate_drop_path_rates, make_divisible
from timm.models._features import feature_take_indices

from ..checkpoint import is_official_layout, remap_keys, unwrap_state_dict, validate_state_dict
from ..layers import get_act
from ..mixers.affnet import AFFMixer
from ..skeleton import MetaFormerBase, MetaFormerHead, MetaFormerStage
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family

__all__ = ["AFFNet", "checkpoint_filter_fn", "official_state_dict", "BLOCK_NORMS", "SPEC"]


class CvnetsLayerNorm2d(nn.LayerNorm):
    """cvnets ``layer_norm`` on NCHW: per pixel over C, ``(x - mean) / (std + eps) * weight + bias`` (eps on std)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, u = torch.std_mean(x, dim=1, keepdim=True, unbiased=False)
        x = (x - u) / (s + self.eps)
        return torch.addcmul(self.bias[:, None, None], x, self.weight[:, None, None])  # as cvnets (same rounding)


def _layer_norm_2d(dim):
    return GroupNorm1(dim, eps=1e-5)


def _layer_norm(dim):
    return CvnetsLayerNorm2d(dim, eps=1e-5)


BLOCK_NORMS = {
    "layer_norm_2d": _layer_norm_2d,  # cvnets LayerNorm2D_NCHW = GroupNorm(1, C), eps 1e-5 (zoo default)
    "groupnorm1": _layer_norm_2d,
    "layer_norm": _layer_norm,        # cvnets LayerNorm, channel-first branch
}


class ConvNormAct(nn.Module):
    """cvnets ``ConvLayer`` with BN: conv (no bias, 'same' padding) -> BatchNorm2d -> optional activation."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 dilation: int = 1, act_layer=None):
        super().__init__()
        pad = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, pad, dilation=dilation, groups=groups,
                              bias=False)
        self.norm = nn.BatchNorm2d(out_chs)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (cvnets): [1x1 expand + act] -> dw3x3 + act -> 1x1 project; skip if stride 1 and C_in=C_out."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float, act_layer, dilation: int = 1):
        super().__init__()
        hidden = make_divisible(int(round(in_chs * expand_ratio)), 8)
        self.exp_1x1 = ConvNormAct(in_chs, hidden, 1, act_layer=act_layer) if expand_ratio != 1 else nn.Identity()
        self.conv_3x3 = ConvNormAct(hidden, hidden, 3, stride, groups=hidden, dilation=dilation, act_layer=act_layer)
        self.red_1x1 = ConvNormAct(hidden, out_chs, 1)
        self.use_res = stride == 1 and in_chs == out_chs

    def forward(self, x):
        y = self.red_1x1(self.conv_3x3(self.exp_1x1(x)))
        return x + y if self.use_res else y


class AFFInnerBlock(nn.Module):
    """Official ``Block``: ``x + drop_path(filter(norm2(mbconv(norm1(x)))))``; mbconv and filter keep own skips."""

    def __init__(self, dim: int, mlp_ratio: float, act_layer, norm_layer, act_name: str, num_groups: int = 8,
                 sparsity_threshold: float = 0.01, drop_path: float = 0., kernel_backend: str = "auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mlp = InvertedResidual(dim, dim, 1, mlp_ratio, act_layer)
        self.norm2 = norm_layer(dim)
        self.token_mixer = AFFMixer(dim, num_groups=num_groups, sparsity_threshold=sparsity_threshold,
                                    act_layer=act_name, inner_skip=True, backend=kernel_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        y = self.token_mixer(self.norm2(self.mlp(self.norm1(x))))
        return x + self.drop_path(y)


class AFFBlock(nn.Module):
    """Official ``AFFBlock`` (no local rep, no unfold): ``fusion(cat(x, conv_proj(norm(blocks(x)))))``."""

    def __init__(self, dim: int, depth: int, act_layer, norm_layer, act_name: str, drop_path: Union[float, List] = 0.,
                 **mixer_kw):
        super().__init__()
        dpr = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        blocks = [AFFInnerBlock(dim, 2.0, act_layer, norm_layer, act_name, drop_path=dpr[i], **mixer_kw)
                  for i in range(depth)]
        self.global_rep = nn.Sequential(*blocks, norm_layer(dim))
        self.conv_proj = ConvNormAct(dim, dim, 1)
        self.fusion = ConvNormAct(2 * dim, dim, 1, act_layer=act_layer)

    def forward(self, x):
        fm = self.conv_proj(self.global_rep(x))
        return self.fusion(torch.cat((x, fm), dim=1))


class AFFNet(MetaFormerBase):
    """AFFNet (see module docstring); variants ``affnet`` / ``affnet_t`` / ``affnet_et`` = cvnets modes ``small`` /
    ``x_small`` / ``xx_small``.

    Args:
        dims: stage widths at strides 4/8/16/32. mv2_expand: MV2 expansion ratio.
        aff_depths: inner blocks of the one AFF block of each of the stages at strides 8/16/32 (stage 0 is three
            fixed MV2 blocks, so this is not a 4-stage ``depths``).

    Own stage modules, not a spec over ``MetaFormer``: the stride-4 stage is MobileNetV2 blocks, each later stage is
    one MobileViT-style AFF block (inner blocks, trailing norm, projection and a fusion conv with the block input),
    the stem ends at stride 2 and a 1x1 expansion (``final_conv``) follows the stages; none of this is a MetaFormer
    block. The skeleton's hooks cover the rest (``_forward_final``, ``final_group_pattern``).
    """

    def __init__(
            self,
            dims: Tuple[int, ...] = (64, 128, 256, 320),
            mv2_expand: float = 4,
            aff_depths: Tuple[int, ...] = (2, 4, 3),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            stem_chs: int = 16,
            layer1_chs: int = 32,
            exp_factor: int = 4,
            max_exp_chs: int = 960,
            act_layer: str = "silu",
            block_norm: str = "layer_norm_2d",
            num_groups: int = 8,
            sparsity_threshold: float = 0.01,
            kernel_backend: str = "auto",
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if block_norm not in BLOCK_NORMS:
            raise ValueError(f"unknown AFFNet block_norm {block_norm!r}; choose one of {sorted(BLOCK_NORMS)}")
        for d in dims[1:]:
            if d % num_groups:
                raise ValueError(f"AFFNet stage width {d} is not divisible by num_groups={num_groups}")
        act = get_act(act_layer)
        act_name = {"swish": "silu"}.get(act_layer.lower(), act_layer.lower())
        norm_layer = BLOCK_NORMS[block_norm]
        self.act_layer, self.block_norm = act_layer, block_norm

        stem = nn.Sequential()
        stem.add_module("conv", ConvNormAct(in_chans, stem_chs, 3, 2, act_layer=act))
        stem.add_module("mv2", InvertedResidual(stem_chs, layer1_chs, 1, mv2_expand, act))
        self.stem = stem

        aff_dpr = calculate_drop_path_rates(drop_path_rate, sum(aff_depths))
        stages, prev, k = [], layer1_chs, 0
        # stride 4: 3 MV2 blocks (first one strided)
        stages.append(MetaFormerStage(
            [InvertedResidual(dims[0], dims[0], 1, mv2_expand, act) for _ in range(2)],
            downsample=InvertedResidual(prev, dims[0], 2, mv2_expand, act)))
        prev = dims[0]
        for i, (d, depth) in enumerate(zip(dims[1:], aff_depths)):
            block = AFFBlock(d, depth, act, norm_layer, act_name, drop_path=aff_dpr[k:k + depth],
                             num_groups=num_groups, sparsity_threshold=sparsity_threshold,
                             kernel_backend=kernel_backend)
            k += depth
            stages.append(MetaFormerStage([block], downsample=InvertedResidual(prev, d, 2, mv2_expand, act)))
            prev = d
        self.stages = nn.Sequential(*stages)
        exp_chs = min(exp_factor * prev, max_exp_chs)
        self.final_conv = ConvNormAct(prev, exp_chs, 1, act_layer=act)

        self._init_interface(in_chans, num_classes, dims, reductions=(4, 8, 16, 32))
        # any size >= 32 works (odd sizes too: strided convs round up, irfft2 takes s=(H, W)); instance attributes
        # so TorchScript sees them
        self.min_input_size = 32
        self.input_divisor = 1
        self.num_features = self.head_hidden_size = exp_chs
        self.head = MetaFormerHead(exp_chs, num_classes, global_pool=global_pool, norm_layer=None,
                                   drop_rate=drop_rate)
        self._init_weights()

    def _init_weights(self):
        # official: cvnets' initialize_weights is a no-op for AFFNet (modules() generator), so convs / BN keep
        # PyTorch defaults; only LinearLayer (xavier_uniform, zero bias) and the AFNO params (0.02 randn) init.
        fc = self.head.fc
        if isinstance(fc, nn.Linear):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    final_group_pattern = r"^final_conv"  # group_matcher: the 1x1 expansion is the last group

    def _forward_final(self, x: torch.Tensor) -> torch.Tensor:
        # the 1x1 expansion ends forward_features (and the final map of forward_intermediates), not the stage outputs
        return self.final_conv(x)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        _, max_index = feature_take_indices(len(self.feature_info), indices)
        if prune_head or max_index < len(self.feature_info) - 1:
            self.final_conv = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        return take_indices


# ------------------------------------------------------------------------------------------------------------------
# checkpoints

# official (cvnets, after dropping every ".block." level) -> zoo
_OFFICIAL_RULES = (
    (r"^conv_1\.", "stem.conv."),
    (r"^layer_1\.0\.", "stem.mv2."),
    (r"^layer_2\.0\.", "stages.0.downsample."),
    (r"^layer_2\.([12])\.", lambda m: f"stages.0.blocks.{int(m.group(1)) - 1}."),
    (r"^layer_([345])\.0\.", lambda m: f"stages.{int(m.group(1)) - 2}.downsample."),
    (r"^layer_([345])\.1\.", lambda m: f"stages.{int(m.group(1)) - 2}.blocks.0."),
    (r"\.filter\.", ".token_mixer."),
    (r"^conv_1x1_exp\.", "final_conv."),
    (r"^classifier\.fc\.", "head.fc."),
)

# zoo -> official (inverse of the rules above, with the ".block." levels put back)
_TO_OFFICIAL = (
    (r"^stem\.conv\.", "conv_1."),
    (r"^stem\.mv2\.", "layer_1.0."),
    (r"^stages\.0\.downsample\.", "layer_2.0."),
    (r"^stages\.0\.blocks\.([01])\.", lambda m: f"layer_2.{int(m.group(1)) + 1}."),
    (r"^stages\.([123])\.downsample\.", lambda m: f"layer_{int(m.group(1)) + 2}.0."),
    (r"^stages\.([123])\.blocks\.0\.", lambda m: f"layer_{int(m.group(1)) + 2}.1."),
    (r"\.token_mixer\.", ".filter."),
    (r"^final_conv\.", "conv_1x1_exp."),
    (r"^head\.fc\.", "classifier.fc."),
)


def _add_block_levels(key: str) -> str:
    """Put back cvnets' ``.block.`` containers: ConvLayer (``x.block.conv``) and InvertedResidual (``x.block.exp_1x1``)."""
    key = re.sub(r"\.(conv|norm)\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r".block.\1.\2", key)
    # InvertedResidual container: "<mv2>.exp_1x1" -> "<mv2>.block.exp_1x1"
    key = re.sub(r"(^layer_\d+\.\d+|\.mlp)\.(exp_1x1|conv_3x3|red_1x1)\.", r"\1.block.\2.", key)
    return key


def official_state_dict(model: AFFNet) -> dict:
    """The model's weights in the official cvnets layout (flat state dict, as ``*_best.pt`` / ``*_ema_best.pt``)."""
    out = {}
    for k, v in remap_keys(model.state_dict(), _TO_OFFICIAL).items():
        out[_add_block_levels(k)] = v.clone()
    return out


def checkpoint_filter_fn(state_dict, model: AFFNet):
    """Official cvnets AFFNet checkpoint (flat ``*_best.pt``, or ``checkpoint.pt`` with ``model_state_dict``) -> zoo."""
    if isinstance(state_dict, dict) and "model_state_dict" in state_dict:
        state_dict = state_dict["model_state_dict"]
    state_dict = unwrap_state_dict(state_dict)
    if is_official_layout(state_dict, "AFFNet", "stem.conv.conv.weight",
                          ("conv_1.block.conv.weight", "layer_3.1.global_rep.0.filter.w1"), "official cvnets"):
        sd = {}
        for k, v in state_dict.items():
            k = re.sub(r"(^|\.)block\.", r"\1", k)
            for pattern, repl in _OFFICIAL_RULES:
                k = re.sub(pattern, repl, k)
            sd[k] = v
        state_dict = sd
    return validate_state_dict(state_dict, model, source="checkpoint (microsoft/TokenMixers cvnets layout)")


# ------------------------------------------------------------------------------------------------------------------
# registration

CITATION = """@inproceedings{huang2023adaptive,
  title={Adaptive Frequency Filters As Efficient Global Token Mixers},
  author={Huang, Zhipeng and Zhang, Zhizheng and Lan, Cuiling and Zha, Zheng-Jun and Lu, Yan and Guo, Baining},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2023}
}"""

_TOP1 = "microsoft/TokenMixers README (256 px)"

# variants: cvnets mode small (AFFNet), x_small (-T), xx_small (-ET); dims per stride 4/8/16/32, AFF blocks per
# stage 8/16/32. MACs exclude the FFTs (FlopCounterMode counts none).
SPEC = FamilySpec(
    name="affnet",
    model_cls=AFFNet,
    arxiv="2307.14008",
    code="https://github.com/microsoft/TokenMixers",
    license="mit",
    citation=CITATION,
    cfg=dict(
        input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=0.888, mean=(0., 0., 0.), std=(1., 1., 1.),
        first_conv="stem.conv.conv",
        origin_url="https://github.com/microsoft/TokenMixers/tree/main/Adaptive%20Frequency%20Filters",
    ),
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict, wrapper=None),
    # no per-output norm: the official dense heads (cvnets DeepLabv3 / PSPNet / SSDLite) take the end points
    # out_l2 .. out_l5 as they are (each stage already ends with a BN'd conv)
    dense_out_norms=(None, None, None, None),
    recipe="affnet",
    card="affnet",
    notes="Official weights are on OneDrive (not fetchable here); in-block norm and activation default to the "
          "reference recommendation (layer_norm_2d, silu), switchable with block_norm= / act_layer=.",
    models=(
        Variant("affnet", dict(dims=(64, 128, 256, 320), mv2_expand=4, aff_depths=(2, 4, 3)),
                params=5_568_696, macs=1_453_721_088, top1=79.8, top1_source=_TOP1),
        Variant("affnet_t", dict(dims=(48, 96, 160, 192), mv2_expand=4, aff_depths=(2, 4, 3)),
                params=2_654_232, macs=786_462_720, top1=77.0, top1_source=_TOP1),
        Variant("affnet_et", dict(dims=(48, 64, 104, 144), mv2_expand=2, aff_depths=(2, 4, 3)),
                params=1_436_264, macs=356_236_800, top1=73.0, top1_source=_TOP1),
    ),
)
register_family(SPEC, __name__)

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
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, GroupNorm1, make_divisible
from timm.models import checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..builder import build_zoo_model
from ..checkpoint import CheckpointError, remap_keys, unwrap_state_dict, validate_state_dict
from ..layers import get_act
from ..mixers.affnet import AFFMixer
from ..skeleton import MetaFormerBase, MetaFormerHead, MetaFormerStage
from ..zoo import register_family

__all__ = ["AFFNet", "checkpoint_filter_fn", "official_state_dict", "DENSE_OUT_NORMS", "dense_out_norm",
           "BLOCK_NORMS"]

# Dense prediction: no per-output norm. The official dense heads (cvnets DeepLabv3 / PSPNet / SSDLite) take the
# encoder end points ``out_l2 .. out_l5`` as they are (each AFF stage already ends with BN'd fusion conv, each MV2
# stage with a BN'd projection), so the dense adapter adds nothing: one entry per output index (stride 4/8/16/32).
DENSE_OUT_NORMS = (None, None, None, None)


def dense_out_norm(stage_idx: int, num_chs: int) -> Optional[nn.Module]:
    """Norm the dense adapter puts on output ``stage_idx``: always None for AFFNet (see ``DENSE_OUT_NORMS``)."""
    return DENSE_OUT_NORMS[stage_idx]


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

# variant -> (mode, stage dims (stride 4, 8, 16, 32), MV2 expansion, AFF blocks per stage 8/16/32)
VARIANTS = {
    "affnet": ("small", (64, 128, 256, 320), 4, (2, 4, 3)),
    "affnet_t": ("x_small", (48, 96, 160, 192), 4, (2, 4, 3)),
    "affnet_et": ("xx_small", (48, 64, 104, 144), 2, (2, 4, 3)),
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
    """AFFNet (see module docstring). ``mode``: ``small`` (AFFNet), ``x_small`` (-T), ``xx_small`` (-ET)."""

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

        aff_dpr = torch.linspace(0, drop_path_rate, sum(aff_depths), device="cpu").tolist()
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

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^final_conv", (99999,)),
            ],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.final_conv(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (cvnets ``out_l2 .. out_l5``, NCHW, strides 4/8/16/32); final = ``final_conv`` output."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; AFFNet returns NCHW intermediates")
        self.check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        stages = self.stages if (torch.jit.is_scripting() or not stop_early) else self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.final_conv(x)
        return x, intermediates

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
    import re
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
    if "stem.conv.conv.weight" not in state_dict:
        if "conv_1.block.conv.weight" not in state_dict:
            sample = ", ".join(sorted(state_dict)[:5])
            raise CheckpointError(
                f"unrecognised checkpoint layout for AFFNet: expected official cvnets keys ('conv_1.block.conv.weight',"
                f" 'layer_3.1.global_rep.0.filter.w1', ...) or zoo keys ('stem.conv.conv.weight'), got {sample} ... "
                f"Is this a checkpoint of another family?")
        import re
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

def _cfg(url: str = "", **kwargs):
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 256, 256), "pool_size": (8, 8),
        "crop_pct": 0.888, "interpolation": "bicubic", "mean": (0., 0., 0.), "std": (1., 1., 1.),
        "first_conv": "stem.conv.conv", "classifier": "head.fc", "license": "mit",
        "paper_ids": "arXiv:2307.14008", "paper_name": "Adaptive Frequency Filters As Efficient Global Token Mixers",
        "origin_url": "https://github.com/microsoft/TokenMixers/tree/main/Adaptive%20Frequency%20Filters",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "affnet": _cfg(),
    "affnet_t": _cfg(),
    "affnet_et": _cfg(),
})

register_family(
    "affnet", list(VARIANTS),
    paper="Adaptive Frequency Filters As Efficient Global Token Mixers (ICCV 2023, arXiv 2307.14008)",
    code="https://github.com/microsoft/TokenMixers", filter_fn=checkpoint_filter_fn, to_official=official_state_dict,
    official_wrapper=None, dense_out_norms=DENSE_OUT_NORMS,
    notes="Official weights are on OneDrive (not fetchable here); in-block norm and activation default to the "
          "reference recommendation (layer_norm_2d, silu), switchable with block_norm= / act_layer=.",
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> AFFNet:
    _, dims, expand, depths = VARIANTS[variant]
    model_args = dict(dims=dims, mv2_expand=expand, aff_depths=depths)
    return build_zoo_model(AFFNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                           **dict(model_args, **kwargs))


@register_model
def affnet(pretrained=False, **kwargs) -> AFFNet:
    """AFFNet (cvnets mode ``small``): 5.57M params, 1.45 GMACs at 256 (FFT not counted)."""
    return _create("affnet", pretrained, **kwargs)


@register_model
def affnet_t(pretrained=False, **kwargs) -> AFFNet:
    """AFFNet-T (cvnets mode ``x_small``): 2.65M params."""
    return _create("affnet_t", pretrained, **kwargs)


@register_model
def affnet_et(pretrained=False, **kwargs) -> AFFNet:
    """AFFNet-ET (cvnets mode ``xx_small``): 1.44M params."""
    return _create("affnet_et", pretrained, **kwargs)

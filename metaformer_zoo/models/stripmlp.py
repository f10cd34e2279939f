"""Strip-MLP (Cao et al., "Strip-MLP: Efficient Token Interaction for Vision MLP", ICCV 2023, arXiv 2307.11458;
official code Med-Process/Strip_MLP ``models/strip_mlp.py``, class ``StripMLPNet``).

Conv 4x4 s4 stem (no bias, no norm); four stages of ``BasicBlock`` = ``x + dp(TokenMixing(x))``,
``x + dp(ChannelMixing(x))`` with a hard-coded constant drop path of 0.1; conv 2x2 s2 merging between stages;
cross-stage shortcuts (grouped 2x2 s2 convs ``conv_s1_28``, ``conv_s1_14``, ``conv_s2_14``) from the stage-2 and
stage-3 inputs into the stage-3 and stage-4 inputs; head BatchNorm2d -> global mean -> Linear. Token mixers in
``metaformer_zoo.mixers.strip`` (``"strip"``, ``"cgsmm"``, ``"lsmm"``).

Sizes: the official model only runs at 224 px (square; the dense strip weights are tied to 56/28/14/7 maps). Here
any size >= 32 px works: at other feature sizes the strip matrices are resampled (see ``metaformer_zoo.mixers.strip``,
a zoo extension; exact at the trained size). ``strict_size=True`` gives the official behaviour with a clear error.
Maps are floored by the stride-4 stem and stride-2 merges as in the official convs.

Checkpoints: the official files are Swin-style dicts ``{"model", "optimizer", "lr_scheduler", "max_accuracy",
"epoch", "config", ...}`` whose ``config`` is a pickled yacs ``CfgNode``. Every loading path (``pretrained=True``,
``checkpoint_path=``, ``tools/convert.py``, ``metaformer_zoo.hub.convert_checkpoint``, dense ``init_cfg``) reads
them with the one safe reader ``metaformer_zoo.checkpoint.load_checkpoint_file``, without
executing arbitrary pickles: ``torch.load(weights_only=True)`` with the name ``yacs.config.CfgNode`` allow-listed to
a plain ``OrderedDict`` stand-in (``metaformer_zoo.checkpoint.SAFE_GLOBALS``), so the config comes back as nested
dicts and yacs need not be installed. The dense outputs: the official code has no dense wrapper; the zoo puts no
norm on the stride 4/8/16/32 stage outputs (``SPEC.dense_out_norms``).

Own stage modules, not a spec over ``MetaFormer``: the blocks are two plain residuals with a shared constant drop
path (no norm before the token mixer, the channel mixer brings its own dwconv + LN + GRN), and the cross-stage
shortcuts feed stage inputs from earlier stages, which a chain of MetaFormer stages cannot express; the skeleton's
``_forward_stages`` hook carries that wiring into ``forward_intermediates``.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices

from ..checkpoint import is_official_layout, remap_keys, unwrap_state_dict, validate_state_dict
from ..mixers.strip import StripTokenMixing
from ..skeleton import MetaFormerBase, MetaFormerHead, MetaFormerStage, to_stage_list
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family

__all__ = ["StripMLP", "checkpoint_filter_fn", "official_state_dict", "SPEC"]


class GRN(nn.Module):
    """ConvNeXt-V2 global response norm on NHWC (official: gamma/beta (1, 1, 1, C), zero init).

    The official ``gamma * (x * Nx) + beta + x`` is computed as ``beta + x * (1 + gamma * Nx)``: the per-(batch,
    channel) scale is formed on the small (B, 1, 1, C) tensor, so the map is read once and written once (the
    official form makes three passes, and its backward saves two map-sized products). Same function; results agree
    to float rounding (~1 ulp). timm's ``GlobalResponseNorm`` is the same layer with other parameter names and the
    three-pass form, so the official names are kept here.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        Gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        Nx = Gx / (Gx.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.beta, x, self.gamma * Nx + 1.0)


class ChannelMixing(nn.Module):
    """DWConv 7x7 -> NHWC -> LayerNorm -> Linear(C, aC) -> GELU -> GRN -> Linear(aC, C) -> NCHW."""

    def __init__(self, dim: int, alpha: int = 3, drop: float = 0.):
        super().__init__()
        self.conv_77 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim, bias=False)
        self.layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, alpha * dim)
        self.activation = nn.GELU()
        self.grn = GRN(alpha * dim)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(alpha * dim, dim)

    def forward(self, x):
        x = self.conv_77(x).permute(0, 2, 3, 1)
        x = self.grn(self.activation(self.fc1(self.layer_norm(x))))
        x = self.drop(self.fc2(x))
        return x.permute(0, 3, 1, 2)


class StripBlock(nn.Module):
    def __init__(self, dim: int, feat_size: Tuple[int, int], alpha: int = 3, drop: float = 0.,
                 drop_path: float = 0.1, strict_size: bool = False):
        super().__init__()
        self.token_mixing = StripTokenMixing(dim, feat_size, strict_size)
        self.channel_mixing = ChannelMixing(dim, alpha, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.token_mixing(x))
        return x + self.drop_path(self.channel_mixing(x))


class Stem(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, patch_size, patch_size, bias=False)

    def forward(self, x):
        return self.conv(x)


class StripMLP(MetaFormerBase):
    """Strip-MLP. Stage i has width ``dims[i]`` (official: ``EMBED_DIM * 2**i``) and feature size
    ``img_size / 4 / 2**i``.

    Args:
        dims, depths: widths and blocks per stage (official ``EMBED_DIM`` doubled per stage, ``LAYERS``); each width
            must be a multiple of the previous one (grouped cross-stage shortcuts).
        mlp_ratios: channel-MLP ratio (official ``alpha`` = 3), one value or one per stage.
        img_size: size the strip weights are built for (224). strict_size: raise at other sizes (official behaviour)
            instead of resampling the strip weights.
        drop_path_rate: constant drop path of every residual (official: hard-coded 0.1; not linear).
    """
    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            img_size: Union[int, Tuple[int, int]] = 224,
            dims: Sequence[int] = (80, 160, 320, 640),
            depths: Sequence[int] = (2, 2, 12, 2),
            mlp_ratios: Union[int, Sequence[int]] = 3,
            strict_size: bool = False,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] != img_size[1]:
            raise ValueError(f"Strip-MLP strip weights are square (official assert H == W): build with a square "
                             f"img_size, not {img_size}; other input sizes still run (strip weights are resampled)")
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"Strip-MLP has 4 stages (cross-stage shortcuts are wired for 4): got depths={depths}, "
                             f"dims={dims}")
        for i in (2, 3):
            if dims[i] % dims[i - 1]:
                raise ValueError(f"Strip-MLP dims={tuple(dims)}: dims[{i}] must be a multiple of dims[{i - 1}] (the "
                                 f"cross-stage shortcut convs are grouped by dims[{i - 1}]); official: doubling")
        mlp_ratios = to_stage_list(mlp_ratios, 4, "mlp_ratios")
        self.img_size = img_size
        dims = list(dims)
        res = img_size[0] // 4
        self.stem = Stem(in_chans, dims[0], 4)
        stages = []
        for i in range(4):
            feat = int(res / 2 ** i)
            blocks = [StripBlock(dims[i], (feat, feat), mlp_ratios[i], proj_drop_rate, drop_path_rate, strict_size)
                      for _ in range(depths[i])]
            merge = None if i == 0 else nn.Conv2d(dims[i - 1], dims[i], 2, 2, bias=False)
            stages.append(MetaFormerStage(blocks, merge))
        self.stages = nn.Sequential(*stages)
        # cross-stage shortcuts (official names)
        self.conv_s1_28 = nn.Conv2d(dims[1], dims[2], 2, 2, 0, groups=dims[1], bias=False)
        self.conv_s1_14 = nn.Conv2d(dims[2], dims[3], 2, 2, 0, groups=dims[2], bias=False)
        self.conv_s2_14 = nn.Conv2d(dims[2], dims[3], 2, 2, 0, groups=dims[2], bias=False)
        self._init_interface(in_chans, num_classes, dims)
        self.min_input_size = 32
        self.head = MetaFormerHead(dims[-1], num_classes, global_pool=global_pool, norm_layer=nn.BatchNorm2d,
                                   norm_first=True, drop_rate=drop_rate)

    def _forward_stages(self, x: torch.Tensor, take: List[int], last: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stages 0..``last`` with the cross-stage shortcuts (the skeleton's stage-loop hook, used by
        ``forward_intermediates``); returns the last output and the outputs in ``take``."""
        feats: List[torch.Tensor] = []
        s1_14: Optional[torch.Tensor] = None
        s1_7: Optional[torch.Tensor] = None
        s2_7: Optional[torch.Tensor] = None
        for i, stage in enumerate(self.stages):
            if i <= last:
                x = stage.downsample(x)
                if i == 1:
                    s1_14 = self.conv_s1_28(x)  # merging1 output -> stage-3 input
                    s1_7 = self.conv_s1_14(s1_14)  # -> stage-4 input
                elif i == 2:
                    s2_7 = self.conv_s2_14(x)  # merging2 output -> stage-4 input
                    assert s1_14 is not None
                    x = x + s1_14
                elif i == 3:
                    assert s1_7 is not None and s2_7 is not None
                    x = x + s1_7 + s2_7
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint_seq(stage.blocks, x)
                else:
                    x = stage.blocks(x)
                if i in take:
                    feats.append(x)
        return x, feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        no_take: List[int] = []
        x, _ = self._forward_stages(x, no_take, len(self.stages) - 1)
        return x

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < 3:
            self.conv_s1_14 = self.conv_s2_14 = nn.Identity()
        if max_index < 2:
            self.conv_s1_28 = nn.Identity()
        return super().prune_intermediate_layers(indices, prune_norm, prune_head)


# --- checkpoints -------------------------------------------------------------------------------------------------

_CGSMM = r"(proj_h|proj_w|fuse_h|fuse_w|BN|relate_pos_h|relate_pos_w)"
OFFICIAL_RULES = (
    (r"^patch_embed\.", "stem.conv."),
    (r"^blocks([1-4])\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^merging([1-3])\.", r"stages.\1.downsample."),
    (r"\.smlp_block\." + _CGSMM + r"\.", r".smlp_block.cgsmm.\1."),
    (r"\.smlp_block\.(fc_h|fc_w|reweight)\.", r".smlp_block.lsmm.\1."),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)
_TO_OFFICIAL = (
    (r"^stem\.conv\.", "patch_embed."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"blocks{int(m.group(1)) + 1}.{m.group(2)}."),
    (r"^stages\.(\d)\.downsample\.", r"merging\1."),
    (r"\.smlp_block\.(cgsmm|lsmm)\.", ".smlp_block."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.(weight|bias)$", r"head.\1"),
)


def checkpoint_filter_fn(state_dict, model: StripMLP):
    """Official Strip-MLP checkpoint (``{"model": ...}`` or a flat dict, optional ``module.`` prefix) -> zoo layout.

    Key moves only (no reshapes): ``patch_embed`` -> ``stem.conv``, ``blocksN.j`` -> ``stages.{N-1}.blocks.j``,
    ``mergingN`` -> ``stages.N.downsample``, the CGSMM / LSMM parameters of ``smlp_block`` into its ``cgsmm`` /
    ``lsmm`` sub-modules, ``norm`` -> ``head.norm``, ``head`` -> ``head.fc``. Validated strictly.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_official_layout(state_dict, "Strip-MLP", "stem.conv.weight",
                          ("patch_embed.weight", "blocks1.0.token_mixing.smlp_block.proj_h.weight"),
                          "official Med-Process/Strip_MLP"):
        state_dict = remap_keys(state_dict, OFFICIAL_RULES)
    return validate_state_dict(state_dict, model, source="checkpoint (Med-Process/Strip_MLP layout)")


def official_state_dict(model: StripMLP):
    """The model's weights in the official layout (inverse of ``checkpoint_filter_fn``); wrap as ``{"model": sd}``."""
    sd = {k: v for k, v in model.state_dict().items()}
    return remap_keys(sd, _TO_OFFICIAL)


# --- registration --------------------------------------------------------------------------------------------------

_URLS = {  # Baidu Pan (extraction code 1234): not directly downloadable; kept for provenance
    "light_t": "https://pan.baidu.com/s/15SQy1MxY5RQlybNVpuFQcg?pwd=1234",
    "t": "https://pan.baidu.com/s/1mUDavm3Y8pmW8p7QmypnNQ?pwd=1234",
    "s": "https://pan.baidu.com/s/1uXoPzrhptbA8FBuQcaOrVg?pwd=1234",
    "b": "https://pan.baidu.com/s/1t4iQuMqUR8yfAO0kRS1EFg?pwd=1234",
}


CITATION = """@inproceedings{cao2023stripmlp,
  title     = {Strip-MLP: Efficient Token Interaction for Vision MLP},
  author    = {Cao, Guiping and Luo, Shengda and Huang, Wenjian and Lan, Xiangyuan and Jiang, Dongmei and
               Wang, Yaowei and Zhang, Jianguo},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023}
}"""

_TOP1 = "Med-Process/Strip_MLP README"


def _dims(embed_dim: int) -> Tuple[int, ...]:
    return tuple(embed_dim * 2 ** i for i in range(4))


# official __main__ comments / configs: EMBED_DIM (doubled per stage) and LAYERS
SPEC = FamilySpec(
    name="stripmlp",
    model_cls=StripMLP,
    arxiv="2307.11458",
    code="https://github.com/Med-Process/Strip_MLP",
    license="mit",
    citation=CITATION,
    cfg={},  # the defaults: Swin-style eval (resize 256 bicubic + center crop 224: crop_pct 0.875)
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict, wrapper="model"),
    # no official dense code: the stage outputs are used raw
    dense_out_norms=(None, None, None, None),
    feature_cfg=dict(feature_cls="getter"),
    recipe="stripmlp",
    card="stripmlp",
    notes="official weights on Baidu Pan (code 1234); the yacs config in the file is read safely by "
          "metaformer_zoo.checkpoint.load_checkpoint_file",
    models=tuple(
        Variant(f"stripmlp_{v}", dict(dims=_dims(embed_dim), depths=depths), params=params, macs=macs, top1=top1,
                top1_source=_TOP1, tags={"in1k": dict(origin_url=_URLS[v])})
        for v, embed_dim, depths, params, macs, top1 in (
            ("light_t", 80, (2, 2, 6, 2), 18_243_920, 2_518_593_280, 81.2),
            ("t", 80, (2, 2, 12, 2), 24_903_920, 3_648_236_800, 82.2),
            ("s", 96, (2, 2, 18, 2), 42_568_600, 6_803_134_464, 83.3),
            ("b", 112, (2, 2, 18, 2), 57_216_480, 9_184_947_968, 83.6),
        )
    ),
)
register_family(SPEC, __name__)

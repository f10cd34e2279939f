"""iFormer: Inception Transformer (Si et al., NeurIPS 2022, arXiv 2205.12956; https://github.com/sail-sg/iFormer).

Not to be confused with timm's own ``iformer_t/s/m/l/h`` (``timm.models.iformer``: "iFormer: Integrating ConvNet and
Transformer for Mobile Application", ICLR 2025), which this module neither touches nor shadows. The zoo registers the
Inception Transformer under its official names ``iformer_{small,base,large}`` and ``iformer_{small,base,large}_384``.

Architecture (official ``models/inception_transformer.py``): a two-conv stem (3x3 s2 conv -> BN -> GELU -> 3x3 s2 conv
-> BN), 3x3 s2 conv + BN downsampling, one learned absolute positional embedding per stage (added after the
downsampling, bilinearly resized to the feature map), pre-norm blocks ``x + ls1 * InceptionMixer(LN(x))``,
``x + ls2 * Mlp(LN(x))`` (LayerNorm eps 1e-6, GELU MLP x4, layer scale 1e-6 only in stages 3-4) and a head that
normalises every token before averaging (``LN -> mean -> Linear``). The share of attention heads ramps up with depth,
changing once inside stage 3 (``attention_heads`` below, one entry per block).

The zoo model is NCHW between and inside blocks (the official one is channels-last); the block LayerNorm is a channel
LayerNorm over the same axis and the MLP 1x1 convs hold the official Linear weights, so outputs agree to float
rounding. It runs at any input size (see ``metaformer_zoo.mixers.inception_transformer`` for the non-square and
odd-size fixes); the positional embeddings are resized on the fly as in the official code, and the checkpoint filter
resizes them when a checkpoint was trained at another ``img_size`` (e.g. 224 weights into an ``_384`` model).

Why its own model class on ``MetaFormerBase`` rather than a ``MetaFormer`` spec: the two-conv BN stem, the BN
downsampling without a norm before it, the per-stage positional table added after the downsampling (``IFormerStage``),
layer scale only in stages 3-4 and an attention-head split that changes per block, not per stage, are not options of
``MetaFormer``. Blocks, MLP, head, init and the timm interface are the skeleton's.
"""
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models import checkpoint_seq, register_notrace_function

from ..checkpoint import is_official_layout, linear_to_conv1x1, remap_keys, unwrap_state_dict, validate_state_dict
from ..mixers.inception_transformer import InceptionMixer
from ..skeleton import MetaFormerBase, MetaFormerBlock, MetaFormerHead, MetaFormerStage, make_mlp, to_stage_list
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family

__all__ = ["InceptionTransformer", "checkpoint_filter_fn", "official_state_dict", "resize_pos_embed", "SPEC"]

# low-frequency (attention) heads of every block of each size, over all stages (official ``attention_heads``)
_ATTENTION_HEADS = {
    "small": [1] * 3 + [3] * 3 + [7] * 4 + [9] * 5 + [11] * 3,
    "base": [1] * 4 + [3] * 6 + [8] * 7 + [10] * 7 + [15] * 6,
    "large": [1] * 4 + [3] * 6 + [10] * 9 + [12] * 9 + [19] * 8,
}


@register_notrace_function
def resize_pos_embed(pos_embed: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """NHWC positional table (1, S_h, S_w, C) -> NCHW (1, C, H, W), bilinearly resized if the grid differs.

    The official code resizes when ``H * W != S * S`` with ``F.interpolate(mode='bilinear')`` (align_corners False);
    comparing the shapes instead gives the same results wherever the official code runs and also handles non-square
    maps whose area happens to equal S * S.
    """
    pos = pos_embed.permute(0, 3, 1, 2)
    if pos.shape[-2] == H and pos.shape[-1] == W:
        return pos
    return F.interpolate(pos, size=(H, W), mode="bilinear", align_corners=False)


class FirstPatchEmbed(nn.Module):
    """Stem: 3x3 s2 conv (C/2) -> BN -> GELU -> 3x3 s2 conv (C) -> BN (official ``FirstPatchEmbed``), NCHW out."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(embed_dim // 2)
        self.gelu1 = nn.GELU()
        self.proj2 = nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        return self.norm2(self.proj2(self.gelu1(self.norm1(self.proj1(x)))))


class PatchEmbed(nn.Module):
    """Downsampling: 3x3 s2 conv (bias) -> BN, no activation (official ``PatchEmbed``), NCHW out."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x))


class IFormerStage(MetaFormerStage):
    """``downsample`` -> ``+ pos_embed`` (NHWC table, resized to the map) -> ``blocks``; NCHW in and out."""

    no_weight_decay_keys = ("pos_embed",)

    def __init__(self, blocks, downsample: Optional[nn.Module], dim: int, pos_size: Tuple[int, int]):
        super().__init__(blocks, downsample)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_size[0], pos_size[1], dim))

    def forward(self, x):
        x = self.downsample(x)
        x = x + resize_pos_embed(self.pos_embed, x.shape[-2], x.shape[-1])
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class InceptionTransformer(MetaFormerBase):
    """iFormer (Inception Transformer) on the zoo skeleton.

    Args:
        img_size: size the positional embeddings are built for (224 or 384 for the official weights); any input size
            runs, the embeddings are resized on the fly.
        depths, dims, num_heads: per stage (head dim 32 in every official variant).
        attention_heads: low-frequency (attention) heads of every block, over all stages (``sum(depths)`` entries).
        mlp_ratios, qkv_bias: MLP expansion (one value or one per stage) and qkv bias (official 4, True).
        layer_scale_init_value / layer_scale_stages: layer scale init and the stages that have it (official: 1e-6 in
            stages 3-4 only; stages 1-2 have no layer-scale parameters).
        drop_rate: dropout inside the MLPs (the official ``drop_rate``); attn_drop_rate: attention dropout;
        drop_path_rate: stochastic depth, linear over all blocks.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (3, 3, 9, 3),
            dims: Sequence[int] = (96, 192, 320, 384),
            num_heads: Sequence[int] = (3, 6, 10, 12),
            attention_heads: Optional[Sequence[int]] = None,
            mlp_ratios: Union[float, Sequence[float]] = 4.,
            qkv_bias: bool = True,
            layer_scale_init_value: Optional[float] = 1e-6,
            layer_scale_stages: Sequence[int] = (2, 3),
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if attention_heads is None:
            attention_heads = _ATTENTION_HEADS["small"]
        if len(attention_heads) != sum(depths):
            raise ValueError(f"attention_heads has {len(attention_heads)} entries, expected one per block "
                             f"({sum(depths)} for depths {tuple(depths)})")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size
        mlp_ratios = to_stage_list(mlp_ratios, len(depths), "mlp_ratios")
        self.stem = FirstPatchEmbed(in_chans, dims[0])
        pos = (img_size[0] // 4, img_size[1] // 4)
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
        stages, idx = [], 0
        for i, depth in enumerate(depths):
            if i > 0:
                pos = (pos[0] // 2, pos[1] // 2)
            ls = layer_scale_init_value if i in layer_scale_stages else None
            blocks = []
            for j in range(depth):
                mixer = InceptionMixer(
                    dims[i], num_heads=num_heads[i], attention_head=attention_heads[idx],
                    pool_size=2 if i < 2 else 1, qkv_bias=qkv_bias, attn_drop=attn_drop_rate)
                mlp = make_mlp(dims[i], mlp_ratios[i], "gelu", bias=True, drop=drop_rate)
                blocks.append(MetaFormerBlock(dims[i], mixer, mlp, norm_layer="layernorm2d",
                                              drop_path=dpr[idx], layer_scale_init_value=ls))
                idx += 1
            downsample = PatchEmbed(dims[i - 1], dims[i]) if i > 0 else None
            stages.append(IFormerStage(blocks, downsample, dims[i], pos))
        self.stages = nn.Sequential(*stages)
        self._init_interface(in_chans, num_classes, dims)
        # any size >= 32 px runs (every map size is computed with ceil); checked by the trunk's input_check
        self.min_input_size = 32
        self.input_divisor = 1
        self.head = MetaFormerHead(self.num_features, num_classes, global_pool=global_pool,
                                   norm_layer="layernorm2d", norm_first=True)
        self.apply(self._init_weights)
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)

    # init: the official ``_init_vit_weights`` without a name (every Linear/Conv, the head included, trunc-normal 0.02,
    # zero bias) is the skeleton's ``MetaFormerBase._init_weights``

    # group_matcher: the per-stage positional table goes with the stage's downsampling (layer decay)
    stage_param_pattern = r"downsample|pos_embed"


# --- official checkpoint layout ----------------------------------------------------------------------------------
_OFFICIAL_RULES = [
    (r"^patch_embed\.", "stem."),
    *[(rf"^patch_embed{i + 1}\.", f"stages.{i}.downsample.") for i in (1, 2, 3)],
    *[(rf"^pos_embed{i + 1}$", f"stages.{i}.pos_embed") for i in range(4)],
    *[(rf"^blocks{i + 1}\.(\d+)\.", rf"stages.{i}.blocks.\1.") for i in range(4)],
    (r"\.attn\.", ".token_mixer."),
    (r"\.layer_scale_([12])$", r".layer_scale\1.scale"),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]

_TO_OFFICIAL = [
    (r"^stem\.", "patch_embed."),
    *[(rf"^stages\.{i}\.downsample\.", f"patch_embed{i + 1}.") for i in (1, 2, 3)],
    *[(rf"^stages\.{i}\.pos_embed$", f"pos_embed{i + 1}") for i in range(4)],
    *[(rf"^stages\.{i}\.blocks\.(\d+)\.", rf"blocks{i + 1}.\1.") for i in range(4)],
    (r"\.token_mixer\.", ".attn."),
    (r"\.layer_scale([12])\.scale$", r".layer_scale_\1"),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
]


def _resize_pos_tables(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    target = model.state_dict()
    for k, v in list(state_dict.items()):
        t = target.get(k)
        if not k.endswith("pos_embed") or t is None or v.dim() != 4 or t.dim() != 4:
            continue
        if v.shape != t.shape and v.shape[0] == t.shape[0] and v.shape[-1] == t.shape[-1]:
            # the same bilinear NHWC resize the forward pass applies, done once at load time
            pos = F.interpolate(v.float().permute(0, 3, 1, 2), size=tuple(t.shape[1:3]), mode="bilinear",
                                align_corners=False)
            state_dict[k] = pos.permute(0, 2, 3, 1).to(v.dtype).contiguous()
    return state_dict


def checkpoint_filter_fn(state_dict, model: InceptionTransformer) -> Dict[str, torch.Tensor]:
    """Official sail-sg/iFormer checkpoint (raw state dict, channels-last Linear MLPs) -> zoo layout, validated.

    Positional embeddings of another ``img_size`` (224 weights into an ``_384`` model) are resized bilinearly, exactly
    as the forward pass would resize them; zoo-layout state dicts pass through (pos tables resized likewise).
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_official_layout(state_dict, "InceptionTransformer (iFormer)", "stem.proj1.weight",
                          ("patch_embed.proj1.weight", "blocks1.0.attn.high_mixer.conv1.weight"),
                          "official sail-sg/iFormer", hint="Is this a checkpoint of another family (timm's unrelated "
                          "iformer_t/s/m/l are a different model)?"):
        state_dict = remap_keys(state_dict, _OFFICIAL_RULES)
    state_dict = linear_to_conv1x1(dict(state_dict), model)
    state_dict = _resize_pos_tables(state_dict, model)
    return validate_state_dict(state_dict, model, source="checkpoint (sail-sg/iFormer layout)")


def official_state_dict(model: InceptionTransformer) -> Dict[str, torch.Tensor]:
    """The model's weights in the official sail-sg/iFormer layout (raw state dict, Linear MLP weights)."""
    out = {}
    for k, v in remap_keys(model.state_dict(), _TO_OFFICIAL).items():
        if v.dim() == 4 and v.shape[2:] == (1, 1) and ".mlp.fc" in k:
            v = v.flatten(1)
        out[k] = v.clone()
    return out


# --- declaration -------------------------------------------------------------------------------------------------
CITATION = """@inproceedings{si2022inception,
  title={Inception Transformer},
  author={Si, Chenyang and Yu, Weihao and Zhou, Pan and Zhou, Yichen and Wang, Xinchao and Yan, Shuicheng},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2022}
}"""

_URL = "https://huggingface.co/sail/dl2/resolve/main/iformer/{}.pth"
_SIZES = {  # depths, dims, num_heads
    "small": ((3, 3, 9, 3), (96, 192, 320, 384), (3, 6, 10, 12)),
    "base": ((4, 6, 14, 6), (96, 192, 384, 512), (3, 6, 12, 16)),
    "large": ((4, 6, 18, 8), (96, 192, 448, 640), (3, 6, 14, 20)),
}
# official params / MACs (counted on the official code) and the published ImageNet-1k top-1
_NUMBERS = {
    "iformer_small": (19_866_344, 4_825_828_736, 83.4), "iformer_base": (47_866_216, 9_341_953_536, 84.6),
    "iformer_large": (86_637_096, 14_004_159_488, 84.8), "iformer_small_384": (20_899_944, 16_031_256_576, 84.6),
    "iformer_base_384": (48_936_296, 30_445_438_976, 85.7), "iformer_large_384": (87_743_656, 45_209_248_768, 85.8),
}


def _variant(size: str, res: int) -> Variant:
    name = f"iformer_{size}" + ("_384" if res == 384 else "")
    depths, dims, heads = _SIZES[size]
    params, macs, top1 = _NUMBERS[name]
    tag = dict(url=_URL.format(name))
    if res == 384:
        tag.update(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
    return Variant(
        name, dict(img_size=res, depths=depths, dims=dims, num_heads=heads,
                   attention_heads=tuple(_ATTENTION_HEADS[size]), layer_scale_init_value=1e-6),
        params=params, macs=macs, top1=top1,
        top1_source="sail-sg/iFormer README" + (" (384 px)" if res == 384 else ""), tags={"sail_in1k": tag})


SPEC = FamilySpec(
    name="iformer",
    model_cls=InceptionTransformer,
    arxiv="2205.12956",
    code="https://github.com/sail-sg/iFormer",
    license="apache-2.0",
    citation=CITATION,
    cfg=dict(crop_pct=0.9, first_conv="stem.proj1"),
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict, wrapper=None),
    # the official repo has no detection / segmentation code: the raw stage outputs, no per-output norm
    dense_out_norms=(None, None, None, None),
    recipe="iformer",
    card="iformer",
    notes="Inception Transformer, not timm's iformer_t/s/m/l/h (ICLR 2025 mobile iFormer); any input size",
    models=tuple(_variant(size, res) for size in _SIZES for res in (224, 384)),
)
register_family(SPEC, __name__)

"""Shared by the MetaFormer-baselines families of the zoo (IdentityFormer, RandFormer; the composed ``zoo_metaformer``
and timm's PoolFormerV2 / ConvFormer / CAFormer specs reuse parts): identity, pretrained cfg, sizes, official format.

They share PoolFormerV2's macro design (sail-sg/metaformer ``metaformer_baselines.py``): conv7 s4 stem with a
post channel-LN (no bias, eps 1e-6), pre-norm conv3 s2 downsampling, "modified LN" block norms (GroupNorm(1) over
(C, H, W), weight only, eps 1e-6), StarReLU MLP without bias, res-scale in stages 3-4, GAP -> LN(eps 1e-6) -> Linear.
"""
from typing import Dict, Mapping

import torch

from ..checkpoint import is_official_layout, linear_to_conv1x1, remap_keys, unwrap_state_dict, validate_state_dict
from ..skeleton import MetaFormer

__all__ = ["CITATION", "IDENTITY", "CFG", "SIZES", "BASE_ARGS", "official_url", "official_tags",
           "checkpoint_filter_fn", "official_state_dict"]

CITATION = """@article{yu2024metaformer,
  title={MetaFormer Baselines for Vision},
  author={Yu, Weihao and Si, Chenyang and Zhou, Pan and Luo, Mi and Zhou, Yichen and Feng, Jiashi and Yan, Shuicheng and Wang, Xinchao},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume={46},
  number={2},
  pages={896--912},
  year={2024}
}"""

# family identity shared by IdentityFormer, RandFormer and the composed zoo_metaformer (FamilySpec fields)
IDENTITY = dict(arxiv="2210.13452",
                code="https://github.com/sail-sg/metaformer", license="apache-2.0", citation=CITATION)

# pretrained-cfg fields shared by every variant (FamilySpec.cfg)
CFG = dict(crop_pct=1.0)

# depths and dims of the five sizes (sail-sg/metaformer metaformer_baselines.py)
SIZES = {
    "s12": dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512)),
    "s24": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512)),
    "s36": dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512)),
    "m36": dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768)),
    "m48": dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768)),
}

# MetaFormer constructor kwargs of the PoolFormerV2 macro design, shared by both families
BASE_ARGS = dict(
    mlp_act="starrelu", mlp_bias=False, norm_layers="groupnorm1_nobias", downsample_norm="layernorm2d_nobias",
    res_scale_init_values=(None, None, 1.0, 1.0), output_norm="layernorm2d",
)


def official_url(family: str, name: str) -> str:
    """The released checkpoint of ``name`` (sail-sg/metaformer README links, hosted on the Hugging Face Hub)."""
    return f"https://huggingface.co/sail/dl/resolve/main/{family}/{name}.pth"


def official_tags(family: str, name: str) -> Dict[str, Dict[str, str]]:
    """The variant's one pretrained tag (``sail_in1k``) with its official URL (``Variant.tags``)."""
    return {"sail_in1k": dict(url=official_url(family, name))}


# official key -> zoo key (sail-sg/metaformer layout; same as timm's MetaFormer conversion)
OFFICIAL_RULES = (
    (r"^downsample_layers\.0\.post_norm\.", "stem.norm."),
    (r"^downsample_layers\.0\.conv\.", "stem.conv."),
    (r"^downsample_layers\.(\d+)\.pre_norm\.", r"stages.\1.downsample.norm."),
    (r"^downsample_layers\.(\d+)\.conv\.", r"stages.\1.downsample.conv."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: MetaFormer) -> Dict[str, torch.Tensor]:
    """Official sail-sg/metaformer checkpoint (plain state dict, NHWC Linear weights) -> zoo layout, validated."""
    state_dict = unwrap_state_dict(state_dict)
    if is_official_layout(state_dict, type(model).__name__, "stem.conv.weight",
                          ("downsample_layers.0.conv.weight", "stages.0.0.norm1.weight"), "official sail-sg/metaformer"):
        state_dict = remap_keys(state_dict, OFFICIAL_RULES)
    state_dict = linear_to_conv1x1(dict(state_dict), model)
    return validate_state_dict(state_dict, model, source="checkpoint (sail-sg/metaformer layout)")


# zoo key -> official key (the inverse of OFFICIAL_RULES), for synthetic official checkpoints in tests and tools
_TO_OFFICIAL = (
    (r"^stem\.norm\.", "downsample_layers.0.post_norm."),
    (r"^stem\.conv\.", "downsample_layers.0.conv."),
    (r"^stages\.(\d+)\.downsample\.norm\.", r"downsample_layers.\1.pre_norm."),
    (r"^stages\.(\d+)\.downsample\.conv\.", r"downsample_layers.\1.conv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
)


def official_state_dict(model: MetaFormer) -> Dict[str, torch.Tensor]:
    """The model's weights in the official sail-sg/metaformer layout (NHWC Linear weights, plain state dict)."""
    out = {}
    for k, v in remap_keys(model.state_dict(), _TO_OFFICIAL).items():
        if v.dim() == 4 and v.shape[2:] == (1, 1) and (".mlp.fc" in k or ".pwconv" in k):
            v = v.flatten(1)
        out[k] = v.clone()
    return out

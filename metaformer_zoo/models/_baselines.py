"""Shared by the MetaFormer-baselines families of the zoo (IdentityFormer, RandFormer): spec, cfg, checkpoint filter.

They share PoolFormerV2's macro design (sail-sg/metaformer ``metaformer_baselines.py``): conv7 s4 stem with a
post channel-LN (no bias, eps 1e-6), pre-norm conv3 s2 downsampling, "modified LN" block norms (GroupNorm(1) over
(C, H, W), weight only, eps 1e-6), StarReLU MLP without bias, res-scale in stages 3-4, GAP -> LN(eps 1e-6) -> Linear.
"""
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..checkpoint import linear_to_conv1x1, remap_keys, unwrap_state_dict, validate_state_dict
from ..skeleton import MetaFormer

CITATION = """@article{yu2024metaformer,
  title={MetaFormer Baselines for Vision},
  author={Yu, Weihao and Si, Chenyang and Zhou, Pan and Luo, Mi and Zhou, Yichen and Feng, Jiashi and Yan, Shuicheng and Wang, Xinchao},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume={46},
  number={2},
  pages={896--912},
  year={2024}
}"""

SIZES = {
    # name: (depths, dims)
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512)),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512)),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512)),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768)),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768)),
}

BASE_ARGS = dict(
    mlp_act="starrelu", mlp_bias=False, norm_layers="groupnorm1_nobias", downsample_norm="layernorm2d_nobias",
    res_scale_init_values=(None, None, 1.0, 1.0), output_norm="layernorm2d",
)

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


def cfg(url: str = "", **kwargs):
    return {
        "url": url, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 1.0, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv", "classifier": "head.fc", "license": "apache-2.0",
        "paper_ids": "arXiv:2210.13452", "paper_name": "MetaFormer Baselines for Vision",
        "origin_url": "https://github.com/sail-sg/metaformer", **kwargs,
    }


def official_url(family: str, name: str) -> str:
    return f"https://huggingface.co/sail/dl/resolve/main/{family}/{name}.pth"


def checkpoint_filter_fn(state_dict, model: MetaFormer):
    """Official sail-sg/metaformer checkpoint (plain state dict, NHWC Linear weights) -> zoo layout, validated."""
    state_dict = unwrap_state_dict(state_dict)
    if "stem.conv.weight" not in state_dict:
        if "downsample_layers.0.conv.weight" not in state_dict:
            raise_layout_error(state_dict, model)
        state_dict = remap_keys(state_dict, OFFICIAL_RULES)
    state_dict = linear_to_conv1x1(dict(state_dict), model)
    return validate_state_dict(state_dict, model, source="checkpoint (sail-sg/metaformer layout)")


def raise_layout_error(state_dict, model):
    from ..checkpoint import CheckpointError
    sample = ", ".join(sorted(state_dict)[:5])
    raise CheckpointError(
        f"unrecognised checkpoint layout for {type(model).__name__}: expected official sail-sg/metaformer keys "
        f"('downsample_layers.0.conv.weight', 'stages.0.0.norm1.weight', ...) or zoo/timm keys ('stem.conv.weight'), "
        f"got {sample} ... Is this a checkpoint of another family?"
    )


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


def official_state_dict(model: MetaFormer):
    """The model's weights in the official sail-sg/metaformer layout (NHWC Linear weights, plain state dict)."""
    out = {}
    for k, v in remap_keys(model.state_dict(), _TO_OFFICIAL).items():
        if v.dim() == 4 and v.shape[2:] == (1, 1) and (".mlp.fc" in k or ".pwconv" in k):
            v = v.flatten(1)
        out[k] = v.clone()
    return out

"""Families that timm already owns: declared (catalogued, converted, dense-adapted), served from timm, never
re-registered.

Re-registering a timm name overwrites timm's entry and drops its pretrained tags, so these specs have
``owner="timm"``: ``register_family`` catalogues them without touching timm's registry. Their official-checkpoint
formats are timm's own ``checkpoint_filter_fn`` made strict, plus the inverse key mapping. Known differences of timm's
implementation from the official code are recorded in the model cards (e.g. PoolFormer v1 head norm after pooling,
Conv/CAFormer MLP-head LayerNorm eps 1e-6 instead of 1e-5).
"""
from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn
from timm.models import mambaout as timm_mambaout
from timm.models import metaformer as timm_metaformer

from ..checkpoint import CheckpointError, remap_keys, unwrap_state_dict, validate_state_dict
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family
from ._baselines import CITATION as BASELINES_CITATION
from ._baselines import official_state_dict as baselines_to_official  # same layout as sail-sg/metaformer

POOLFORMER_CITATION = """@inproceedings{yu2022metaformer,
  title={MetaFormer is Actually What You Need for Vision},
  author={Yu, Weihao and Luo, Mi and Zhou, Pan and Si, Chenyang and Zhou, Yichen and Wang, Xinchao and Feng, Jiashi and Yan, Shuicheng},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={10819--10829},
  year={2022}
}"""

MAMBAOUT_CITATION = """@article{yu2024mambaout,
  title={MambaOut: Do We Really Need Mamba for Vision?},
  author={Yu, Weihao and Wang, Xinchao},
  journal={arXiv preprint arXiv:2405.07992},
  year={2024}
}"""


def _timm_filter(timm_filter: Callable, layout_keys: Sequence[str]) -> Callable:
    """timm's checkpoint_filter_fn made strict: unwrap, recognise the layout, remap, validate (CheckpointError)."""

    def filter_fn(state_dict, model):
        state_dict = unwrap_state_dict(state_dict)
        if not any(k in state_dict for k in layout_keys):
            sample = ", ".join(sorted(state_dict)[:5])
            raise CheckpointError(
                f"unrecognised checkpoint layout for {type(model).__name__}: expected one of the keys "
                f"{', '.join(layout_keys)}; got {sample} ... Is this a checkpoint of another family?")
        try:
            out = timm_filter(dict(state_dict), model)
        except KeyError as e:
            raise CheckpointError(
                f"checkpoint key {e} has no counterpart in {type(model).__name__}: the checkpoint is of another "
                f"family or variant (check depths/dims). Nothing was loaded.") from None
        return validate_state_dict(out, model, source="checkpoint (official layout)")

    return filter_fn


def _pool_v1_to_official(model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm PoolFormer v1 -> sail-sg/poolformer layout (``patch_embed.proj``, ``network.{0..6}``, ``layer_scale_1``)."""
    rules = (
        (r"^stem\.conv\.", "patch_embed.proj."),
        (r"^stages\.(\d+)\.downsample\.conv\.", lambda m: f"network.{2 * int(m.group(1)) - 1}.proj."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"network.{2 * int(m.group(1))}.{m.group(2)}."),
        (r"layer_scale(\d)\.scale$", r"layer_scale_\1"),
        (r"^head\.norm\.", "norm."),
        (r"^head\.fc\.", "head."),
    )
    return {k: v.clone() for k, v in remap_keys(model.state_dict(), rules).items()}


def _mambaout_to_official(model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm MambaOut -> yuweihao/MambaOut layout (``downsample_layers``, ``stages.i.j``, MLP head fc1/norm/fc2)."""
    rules = (
        (r"^stem\.", "downsample_layers.0."),
        (r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
        (r"^head\.norm\.", "norm."),
        (r"^head\.fc\.", "head.fc2."),
        (r"^head\.pre_logits\.fc\.", "head.fc1."),
        (r"^head\.pre_logits\.norm\.", "head.norm."),
    )
    return {k: v.clone() for k, v in remap_keys(model.state_dict(), rules).items()}


_META_FILTER = _timm_filter(timm_metaformer.checkpoint_filter_fn,
                            ("stem.conv.weight", "downsample_layers.0.conv.weight", "patch_embed.proj.weight"))
_MAMBAOUT_FILTER = _timm_filter(timm_mambaout.checkpoint_filter_fn,
                                ("stem.conv1.weight", "downsample_layers.0.conv1.weight"))

def _models(source: str, rows) -> tuple:
    """Variants from (name, params, MACs, top-1) rows: timm's counts at 224 px, the official README top-1."""
    return tuple(Variant(name, params=params, macs=macs, top1=top1, top1_source=source)
                 for name, params, macs, top1 in rows)


# params / MACs (FlopCounterMode FLOPs / 2 at 224 px) of timm's implementation; top-1 of the official README
_POOLFORMER = _models("sail-sg/poolformer README", (
    ("poolformer_s12", 11_915_176, 1_812_267_008, 77.2),
    ("poolformer_s24", 21_388_968, 3_392_208_896, 80.3),
    ("poolformer_s36", 30_862_760, 4_972_150_784, 81.4),
    ("poolformer_m36", 56_172_520, 8_758_788_096, 82.1),
    ("poolformer_m48", 73_473_448, 11_533_320_192, 82.5),
))
_POOLFORMERV2 = _models("sail-sg/metaformer README", (
    ("poolformerv2_s12", 11_891_712, 1_812_267_008, 78.0),
    ("poolformerv2_s24", 21_341_464, 3_392_208_896, 80.7),
    ("poolformerv2_s36", 30_791_216, 4_972_150_784, 81.6),
    ("poolformerv2_m36", 56_077_168, 8_758_788_096, 82.2),
    ("poolformerv2_m48", 73_346_056, 11_533_320_192, 82.6),
))
_CONVFORMER = _models("sail-sg/metaformer README", (
    ("convformer_s18", 26_774_448, 3_940_984_320, 83.0),
    ("convformer_s36", 40_012_152, 7_639_683_072, 84.1),
    ("convformer_m36", 57_051_640, 12_842_333_568, 84.5),
    ("convformer_b36", 99_882_616, 22_629_413_376, 84.8),
))
_CAFORMER = _models("sail-sg/metaformer README", (
    ("caformer_s18", 26_341_656, 4_106_941_440, 83.6),
    ("caformer_s36", 39_297_102, 7_971_597_312, 84.5),
    ("caformer_m36", 56_204_878, 13_240_630_656, 85.2),
    ("caformer_b36", 98_753_614, 23_160_476_160, 85.5),
))
_MAMBAOUT = _models("yuweihao/MambaOut README", (
    ("mambaout_femto", 7_304_536, 1_147_984_992, 78.9),
    ("mambaout_kobe", 9_141_208, 1_505_865_312, 80.0),
    ("mambaout_tiny", 26_545_096, 4_469_655_744, 82.7),
    ("mambaout_small", 48_488_072, 8_936_423_616, 84.1),
    ("mambaout_base", 84_813_092, 15_794_325_760, 84.2),
))

_BASELINES = dict(arxiv="2210.13452",
                  code="https://github.com/sail-sg/metaformer", citation=BASELINES_CITATION)


# the official per-output norm of the dense backbones (reference/metaformer.md section 7): PoolFormer v1's fork_feat
# backbone puts GroupNorm(1, C) (eps 1e-5) on each output; the others have no official dense code (adapter default)
for _spec in (
    FamilySpec("poolformer", _POOLFORMER, owner="timm",
               arxiv="2111.11418",
               code="https://github.com/sail-sg/poolformer", citation=POOLFORMER_CITATION,
               official=OfficialFormat(filter=_META_FILTER, to_official=_pool_v1_to_official),
               dense_out_norms=("groupnorm1",) * 4, recipe="poolformer", card="poolformer"),
    FamilySpec("poolformerv2", _POOLFORMERV2, owner="timm", **_BASELINES,
               official=OfficialFormat(filter=_META_FILTER, to_official=baselines_to_official),
               recipe="poolformerv2", card="poolformer"),
    FamilySpec("convformer", _CONVFORMER, owner="timm", **_BASELINES,
               official=OfficialFormat(filter=_META_FILTER, to_official=baselines_to_official),
               recipe="convformer", card="convformer_caformer"),
    FamilySpec("caformer", _CAFORMER, owner="timm", **_BASELINES,
               official=OfficialFormat(filter=_META_FILTER, to_official=baselines_to_official),
               recipe="caformer", card="convformer_caformer"),
    FamilySpec("mambaout", _MAMBAOUT, owner="timm",
               code="https://github.com/yuweihao/MambaOut", citation=MAMBAOUT_CITATION,
               official=OfficialFormat(filter=_MAMBAOUT_FILTER, to_official=_mambaout_to_official),
               recipe="mambaout", card="mambaout"),
):
    register_family(_spec)

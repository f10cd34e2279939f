"""RaftMLP (Tatsunami & Taki, "RaftMLP: How Much Can Be Done Without Attention and with Less Spatial Locality?",
arXiv 2108.04384; official code okojoalg/raft-mlp, settings ``imagenet-raft-mlp-cross-mlp-emb-{s,m,l}``).

Four levels; each is a cross-scale MLP embedding (stride 4, then 2) followed by ``depth`` blocks of
[vertical raft token MLP, horizontal raft token MLP, channel MLP], each a pre-LN residual with a constant drop path
(0.1 in the official recipe), and a LayerNorm -> global mean -> Linear head. The raft token mixer lives in
``metaformer_zoo.mixers.raft`` (registered as ``"raft"``) and mixes through the ``strip_mix`` kernel op.

Faithfulness notes (see model_cards/raftmlp.md):

* the cross-scale embedding ``Linear(C * sum(k^2) -> D)`` over concatenated unfolds is computed as a sum of strided
  convs (one per kernel k, padding (k - s) / 2): the same function and parameter count; ``checkpoint_filter_fn``
  splits the official Linear weight;
* inputs whose size is not a multiple of a level's stride are bicubically resized up to the next multiple, and the
  token-mixing sub-blocks bicubically resample the feature map to the built grid and back, exactly as official;
  so any input size works and 224 (the built size) is the faithful one;
* the stride-4 feature (``forward_intermediates`` / ``features_only`` index 0) is the embedding output **before** the
  stage-1 blocks, as in the official mmdet/mmseg wrappers; strides 8/16/32 are level outputs. The official dense
  wrappers put no norm on their outputs (``SPEC.dense_out_norms``).
* the LN weights of the token-mixing sub-blocks are stored in natural channel order (official: permuted).

There are no public RaftMLP weights; ``checkpoint_filter_fn`` converts the flat state dicts the official Ignite
training writes (``levels.*``, ``heads.0.1.*``, ``classifier.*``); read a file with
``metaformer_zoo.hub.convert_checkpoint("raftmlp_s", path)``.

Own stage modules, not a spec over ``MetaFormer``: the embedding of every level is a cross-scale unfold-MLP (not a
conv stem / downsampling layer), the blocks are the raft token MLPs on a fixed grid plus a channel MLP in NHWC, and
the drop path is constant; the skeleton's ``stem_is_first_feature`` hook gives the official stride-4 feature.
"""
import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp
from timm.models import register_notrace_function

from ..checkpoint import CheckpointError, is_official_layout, unwrap_state_dict, validate_state_dict
from ..mixers.raft import RaftTokenMixing, raft_ln_from_official, raft_ln_to_official
from ..skeleton import MetaFormerBase, MetaFormerHead, MetaFormerStage, to_stage_list
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family

__all__ = ["RaftMLP", "checkpoint_filter_fn", "official_state_dict", "SPEC"]

DEPTHS = (2, 2, 6, 2)
EMBED_KERNELS = ((4, 8), (2, 4), (2, 4), (2,))
STRIDES = (4, 2, 2, 2)


@register_notrace_function
def resize_to_multiple(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Bicubically resize H, W up to the next multiple of ``stride`` (official ``Level.forward``); no-op otherwise."""
    H, W = x.shape[-2], x.shape[-1]
    if H % stride == 0 and W % stride == 0:
        return x
    size = (int(math.ceil(H / stride)) * stride, int(math.ceil(W / stride)) * stride)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


class CrossScaleEmbedding(nn.Module):
    """Cross-scale MLP embedding: ``Linear(C * sum_k k^2 -> D)`` over unfolds with kernels ``k``, stride min(k),
    padding (k - s) / 2, written as a sum of convs ``proj.i`` (bias on ``proj.0`` only)."""

    def __init__(self, in_chs: int, out_chs: int, kernels: Sequence[int], stride: int):
        super().__init__()
        self.stride = stride
        self.kernels = tuple(kernels)
        if min(kernels) != stride or any(k % stride for k in kernels):
            raise ValueError(f"embedding kernels {kernels} must be multiples of the stride {stride}")
        self.proj = nn.ModuleList([
            nn.Conv2d(in_chs, out_chs, k, stride, (k - stride) // 2, bias=(i == 0)) for i, k in enumerate(kernels)
        ])
        # official init: one nn.Linear with fan_in = C * sum(k^2)
        bound = 1.0 / math.sqrt(in_chs * sum(k * k for k in kernels))
        for conv in self.proj:
            nn.init.uniform_(conv.weight, -bound, bound)
            if conv.bias is not None:
                nn.init.uniform_(conv.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to_multiple(x, self.stride)
        out = self.proj[0](x)
        for i, conv in enumerate(self.proj):
            if i > 0:
                out = out + conv(x)
        return out


class RaftBlock(nn.Module):
    """[vertical, horizontal raft token MLP] (``token_mixer``) then the channel MLP: ``x + dp(mlp(norm(x)))``."""

    def __init__(self, dim: int, grid: Tuple[int, int], raft_size: int = 2, token_expansion: int = 2,
                 mlp_ratio: float = 4, drop: float = 0., drop_path: float = 0.):
        super().__init__()
        self.token_mixer = RaftTokenMixing(dim, grid, raft_size, token_expansion, drop_path=drop_path, proj_drop=drop)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        y = x.permute(0, 2, 3, 1)
        y = y + self.drop_path(self.mlp(self.norm(y)))
        return y.permute(0, 3, 1, 2)


class RaftMLP(MetaFormerBase):
    """RaftMLP with cross-scale embeddings (the paper's RaftMLP-S/M/L).

    Args:
        dims, depths: per level. embed_kernels / strides: cross-scale embedding per level.
        raft_size: r (channels per raft, strided). token_expansion: token-MLP ratio (2). mlp_ratios: channel-MLP
            ratio (4), one value or one per level.
        img_size: the size the token MLPs are built for (grid = ceil(img / 4), then halved with ceil per level).
        drop_path_rate: **constant** drop path of every sub-block (official: 0.1 in every block; not linear).
    """
    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            img_size: Union[int, Tuple[int, int]] = 224,
            dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = DEPTHS,
            embed_kernels: Sequence[Sequence[int]] = EMBED_KERNELS,
            strides: Sequence[int] = STRIDES,
            raft_size: int = 2,
            token_expansion: int = 2,
            mlp_ratios: Union[int, Sequence[int]] = 4,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size
        self.raft_size = raft_size
        grid = img_size
        mlp_ratios = to_stage_list(mlp_ratios, len(dims), "mlp_ratios")
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            grid = tuple(int(math.ceil(g / strides[i])) for g in grid)
            embed = CrossScaleEmbedding(in_chans if i == 0 else dims[i - 1], dim, embed_kernels[i], strides[i])
            if i == 0:
                self.stem = embed
            blocks = [RaftBlock(dim, grid, raft_size, token_expansion, mlp_ratios[i], proj_drop_rate,
                                drop_path_rate) for _ in range(depth)]
            stages.append(MetaFormerStage(blocks, None if i == 0 else embed))
        self.stages = nn.Sequential(*stages)
        reductions = [int(math.prod(strides[:i + 1])) for i in range(len(dims))]
        self._init_interface(in_chans, num_classes, dims, reductions=reductions)
        # the stride-4 feature is the embedding output before the stage-1 blocks (official dense wrappers)
        self.feature_info[0]["module"] = "stem"
        self.head = MetaFormerHead(dims[-1], num_classes, global_pool=global_pool,
                                   norm_layer=lambda c: LayerNorm2d(c, eps=1e-5), norm_first=True, drop_rate=drop_rate)
        self.stem_is_first_feature = True


# --- checkpoints -------------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict, model: RaftMLP):
    """Official RaftMLP state dict (flat, from the Ignite ``Checkpoint({"model": ...})``) -> zoo layout, validated.

    * ``levels.i.fn.0.fc.{weight,bias}`` (cross-scale Linear over concatenated unfolds) -> split into the embedding
      convs ``stem.proj.n`` / ``stages.i.downsample.proj.n`` (``(D, C * k^2)`` -> ``(D, C, k, k)``);
    * ``levels.i.fn.{2+j}.{1,3}.norm.1.*`` (permuted LN) -> ``token_mixer.{vertical,horizontal}.norm.*`` in natural
      channel order; ``...{1,3}.fn.{0,3}.*`` -> ``...fc1/fc2``;
    * ``levels.i.fn.{2+j}.5.{norm,fn.0,fn.3}.*`` -> ``blocks.j.{norm,mlp.fc1,mlp.fc2}``;
    * ``heads.0.1.*`` -> ``head.norm.*``, ``classifier.*`` -> ``head.fc.*``.
    Zoo-layout dicts pass through (validated).
    """
    state_dict = unwrap_state_dict(state_dict)
    if not is_official_layout(state_dict, "RaftMLP", "stem.proj.0.weight",
                              ("levels.0.fn.0.fc.weight", "levels.0.fn.2.1.fn.0.weight"), "official okojoalg/raft-mlp",
                              hint="Is this a checkpoint of another family, or of the 'emb_mixer' / isotropic settings "
                                   "(not supported: only the cross-scale-embedding S/M/L models are)?"):
        return validate_state_dict(state_dict, model, source="checkpoint (zoo layout)")
    r = model.raft_size
    out = {}
    num_levels = len(model.stages)
    for i in range(num_levels):
        stage = model.stages[i]
        emb = model.stem if i == 0 else stage.downsample
        emb_key = "stem" if i == 0 else f"stages.{i}.downsample"
        w = state_dict[f"levels.{i}.fn.0.fc.weight"]
        D = w.shape[0]
        start = 0
        for n, conv in enumerate(emb.proj):
            C, k = conv.in_channels, conv.kernel_size[0]
            size = C * k * k
            if start + size > w.shape[1]:
                raise CheckpointError(f"levels.{i}.fn.0.fc.weight has {w.shape[1]} inputs; the model's embedding "
                                      f"needs {sum(c.in_channels * c.kernel_size[0] ** 2 for c in emb.proj)}")
            out[f"{emb_key}.proj.{n}.weight"] = w[:, start:start + size].reshape(D, C, k, k).clone()
            start += size
        if start != w.shape[1]:
            raise CheckpointError(f"levels.{i}.fn.0.fc.weight has {w.shape[1]} inputs but the model's embedding "
                                  f"takes {start}: different embedding kernels or dims")
        out[f"{emb_key}.proj.0.bias"] = state_dict[f"levels.{i}.fn.0.fc.bias"]
        for j in range(len(stage.blocks)):
            src, dst = f"levels.{i}.fn.{2 + j}", f"stages.{i}.blocks.{j}"
            for sub, name in ((1, "vertical"), (3, "horizontal")):
                for p in ("weight", "bias"):
                    v = state_dict.get(f"{src}.{sub}.norm.1.{p}")
                    if v is not None:
                        out[f"{dst}.token_mixer.{name}.norm.{p}"] = raft_ln_from_official(v, r)
                    for a, b in ((0, "fc1"), (3, "fc2")):
                        v = state_dict.get(f"{src}.{sub}.fn.{a}.{p}")
                        if v is not None:
                            out[f"{dst}.token_mixer.{name}.{b}.{p}"] = v
            for p in ("weight", "bias"):
                for a, b in (("norm", "norm"), ("fn.0", "mlp.fc1"), ("fn.3", "mlp.fc2")):
                    v = state_dict.get(f"{src}.5.{a}.{p}")
                    if v is not None:
                        out[f"{dst}.{b}.{p}"] = v
    for p in ("weight", "bias"):
        if f"heads.0.1.{p}" in state_dict:
            out[f"head.norm.{p}"] = state_dict[f"heads.0.1.{p}"]
        if f"classifier.{p}" in state_dict:
            out[f"head.fc.{p}"] = state_dict[f"classifier.{p}"]
    # official keys this conversion did not consume -> report them (e.g. extra levels / blocks, shortcut heads)
    consumed_prefixes = ("levels.", "heads.0.1.", "classifier.")
    stray = [k for k in state_dict if not k.startswith(consumed_prefixes)]
    level_keys = {k for k in state_dict if k.startswith("levels.")}
    expected = set(official_state_dict(model, _keys_only=True))
    stray += sorted(k for k in level_keys if k not in expected)
    stray += [k for k in state_dict if k.startswith("heads.") and not k.startswith("heads.0.1.")]
    if stray:
        raise CheckpointError(
            f"official RaftMLP checkpoint has {len(stray)} key(s) this model does not have: {', '.join(stray[:6])} ... "
            f"(different depths, or a 'shortcut=True' multi-level head). Nothing was loaded.")
    return validate_state_dict(out, model, source="checkpoint (okojoalg/raft-mlp layout)")


def official_state_dict(model: RaftMLP, _keys_only: bool = False):
    """The model's weights in the official okojoalg/raft-mlp layout (inverse of ``checkpoint_filter_fn``)."""
    sd = model.state_dict()
    r = model.raft_size
    out = {}
    for i, stage in enumerate(model.stages):
        emb_key = "stem" if i == 0 else f"stages.{i}.downsample"
        emb = model.stem if i == 0 else stage.downsample
        ws = [sd[f"{emb_key}.proj.{n}.weight"] for n in range(len(emb.proj))]
        out[f"levels.{i}.fn.0.fc.weight"] = torch.cat([w.reshape(w.shape[0], -1) for w in ws], dim=1)
        out[f"levels.{i}.fn.0.fc.bias"] = sd[f"{emb_key}.proj.0.bias"]
        for j in range(len(stage.blocks)):
            src, dst = f"stages.{i}.blocks.{j}", f"levels.{i}.fn.{2 + j}"
            for sub, name in ((1, "vertical"), (3, "horizontal")):
                for p in ("weight", "bias"):
                    out[f"{dst}.{sub}.norm.1.{p}"] = raft_ln_to_official(sd[f"{src}.token_mixer.{name}.norm.{p}"], r)
                    out[f"{dst}.{sub}.fn.0.{p}"] = sd[f"{src}.token_mixer.{name}.fc1.{p}"]
                    out[f"{dst}.{sub}.fn.3.{p}"] = sd[f"{src}.token_mixer.{name}.fc2.{p}"]
            for p in ("weight", "bias"):
                out[f"{dst}.5.norm.{p}"] = sd[f"{src}.norm.{p}"]
                out[f"{dst}.5.fn.0.{p}"] = sd[f"{src}.mlp.fc1.{p}"]
                out[f"{dst}.5.fn.3.{p}"] = sd[f"{src}.mlp.fc2.{p}"]
    for p in ("weight", "bias"):
        out[f"heads.0.1.{p}"] = sd[f"head.norm.{p}"]
        if f"head.fc.{p}" in sd:
            out[f"classifier.{p}"] = sd[f"head.fc.{p}"]
    return list(out) if _keys_only else out


# --- registration --------------------------------------------------------------------------------------------------

CITATION = """@misc{tatsunami2021raftmlp,
  title         = {RaftMLP: How Much Can Be Done Without Attention and with Less Spatial Locality?},
  author        = {Yuki Tatsunami and Masato Taki},
  year          = {2021},
  eprint        = {2108.04384},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV}
}"""

_TOP1 = "paper arXiv 2108.04384 (recalled; README has none; no weights)"

# official settings imagenet-raft-mlp-cross-mlp-emb-{s,m,l}; constant drop path 0.1 (official recipe)
SPEC = FamilySpec(
    name="raftmlp",
    model_cls=RaftMLP,
    code="https://github.com/okojoalg/raft-mlp",
    license="apache-2.0",
    citation=CITATION,
    # official eval: Resize(256) + CenterCrop(224) (the default crop_pct 0.875), bilinear
    cfg=dict(interpolation="bilinear", first_conv="stem.proj.0"),
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict, wrapper=None),
    # the official dense wrappers (backbones/__init__.py) return the raw maps: no norm on any output
    dense_out_norms=(None, None, None, None),
    feature_cfg=dict(feature_cls="getter"),
    recipe="raftmlp",
    card="raftmlp",
    notes="no public weights; stride-4 dense feature taken before the stage-1 blocks",
    models=(
        Variant("raftmlp_s", dict(dims=(64, 128, 256, 512), drop_path_rate=0.1),
                params=9_868_768, macs=2_087_030_784, top1=76.1, top1_source=_TOP1),
        Variant("raftmlp_m", dict(dims=(96, 192, 384, 768), drop_path_rate=0.1),
                params=21_413_632, macs=4_267_333_632, top1=78.8, top1_source=_TOP1),
        Variant("raftmlp_l", dict(dims=(128, 192, 512, 1024), drop_path_rate=0.1),  # irregular stage 2, as official
                params=36_184_672, macs=6_543_974_400, top1=79.4, top1_source=_TOP1),
    ),
)
register_family(SPEC, __name__)

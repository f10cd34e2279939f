"""TransXNet (Lou et al., IEEE TNNLS 2025, arXiv 2310.19380; https://github.com/LMMMEng/TransXNet).

Architecture (official ``models/transxnet.py``): a 7x7 s4 conv stem (padding 3, no bias) + BN, 3x3 s2 conv + BN
downsampling, blocks ``x = x + dw7x7(x)`` (per-block conditional positional encoding, outside the residual scaling),
``x = x + DP(LS1(DMixer(GN(x), rel_pos)))``, ``x = x + DP(LS2(MSFFN(GN(x))))`` with ``GroupNorm(1, C)`` (eps 1e-5)
norms and a LayerScale that is a per-channel affine (weight (C, 1, 1, 1) init 1e-5 AND bias), one zero-initialised
relative position bias per stage shared by all its blocks, and a ``GN(1) -> avgpool -> 1x1 conv`` classifier (a Linear
here). The D-Mixer lives in ``metaformer_zoo.mixers.transxnet``.

Any input size runs (every size is computed with ceil, as in the official code); the relative position bias is
resized with the official "bicubic on the flattened (Nq, Nk) matrix" rule, once per stage instead of once per block
(same values). The checkpoint filter applies the same rule when a checkpoint was built for another ``img_size``.
Training at batch size 1 works (see the IDConv note in the mixer module); eval outputs are the official ones.

Why its own block and stage modules on ``MetaFormerBase`` rather than a ``MetaFormer`` spec: the block has a
conditional positional encoding outside the residual scaling, a LayerScale that is a per-channel affine with bias,
and its D-Mixer takes the stage's shared relative position bias as a second input, which ``MetaFormerBlock`` /
``MetaFormerStage`` (one-input mixers) do not carry. Stem/downsampling, head, init and the timm interface are the
skeleton's.
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, calculate_drop_path_rates
from timm.models import checkpoint

from ..checkpoint import CheckpointError, is_official_layout, remap_keys, unwrap_state_dict, validate_state_dict
from ..mixers.transxnet import ConvBN, DMixer, rel_pos_shape, resize_rel_pos
from ..skeleton import MetaFormerBase, MetaFormerHead
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family

__all__ = ["TransXNet", "checkpoint_filter_fn", "official_state_dict", "SPEC"]

class MultiScaleDWConv(nn.Module):
    """Depthwise convs with kernels 1/3/5/7 on 4 channel groups (the first takes the remainder), with bias."""

    def __init__(self, dim: int, scale: Tuple[int, ...] = (1, 3, 5, 7)):
        super().__init__()
        self.channels = []
        self.proj = nn.ModuleList()
        for i, k in enumerate(scale):
            c = dim - dim // len(scale) * (len(scale) - 1) if i == 0 else dim // len(scale)
            self.channels.append(c)
            self.proj.append(nn.Conv2d(c, c, kernel_size=k, padding=k // 2, groups=c))

    def forward(self, x):
        xs = torch.split(x, self.channels, dim=1)
        out = []
        for i, conv in enumerate(self.proj):
            if conv.kernel_size[0] == 1:
                # a depthwise 1x1 conv is a per-channel affine; PyTorch's CPU conv takes a very slow per-group path
                # for it, so compute it elementwise (same values up to float rounding)
                b = conv.bias
                assert b is not None
                out.append(xs[i] * conv.weight.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))
            else:
                out.append(conv(xs[i]))
        return torch.cat(out, dim=1)


class MSFFN(nn.Module):
    """MS-FFN: 1x1 (no bias) -> GELU -> BN; ``x + MultiScaleDWConv(x)``; GELU -> BN -> drop; 1x1 (no bias) -> BN -> drop."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Sequential(
            nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=False),
            nn.GELU(),
            nn.BatchNorm2d(hidden_features),
        )
        self.dwconv = MultiScaleDWConv(hidden_features)
        self.act = nn.GELU()
        self.norm = nn.BatchNorm2d(hidden_features)
        self.fc2 = nn.Sequential(
            nn.Conv2d(hidden_features, in_features, kernel_size=1, bias=False),
            nn.BatchNorm2d(in_features),
        )
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.dwconv(x) + x
        x = self.drop(self.norm(self.act(x)))
        return self.drop(self.fc2(x))


class LayerScale(nn.Module):
    """Per-channel affine ``weight * x + bias`` as a grouped 1x1 conv (weight (C, 1, 1, 1) init ``init_value``, bias 0)."""

    no_weight_decay_keys = ("weight", "bias")

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, 1, 1, 1) * init_value)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # official: F.conv2d(x, weight, bias, groups=C); elementwise gives the same values (up to float rounding)
        # without the slow per-group CPU path of depthwise 1x1 convs
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class TransXNetBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 7, sr_ratio: int = 1, num_groups: int = 2, num_heads: int = 1,
                 mlp_ratio: float = 4., drop: float = 0., drop_path: float = 0.,
                 layer_scale_init_value: Optional[float] = 1e-5):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm1 = nn.GroupNorm(1, dim, eps=1e-5)
        self.token_mixer = DMixer(dim, kernel_size=kernel_size, num_groups=num_groups, num_heads=num_heads,
                                  sr_ratio=sr_ratio, rel_pos=False)
        self.norm2 = nn.GroupNorm(1, dim, eps=1e-5)
        self.mlp = MSFFN(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if layer_scale_init_value is not None:
            self.layer_scale_1 = LayerScale(dim, layer_scale_init_value)
            self.layer_scale_2 = LayerScale(dim, layer_scale_init_value)
        else:
            self.layer_scale_1 = nn.Identity()
            self.layer_scale_2 = nn.Identity()

    def forward(self, x: torch.Tensor, relative_pos_enc: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.layer_scale_1(self.token_mixer(self.norm1(x), relative_pos_enc)))
        x = x + self.drop_path(self.layer_scale_2(self.mlp(self.norm2(x))))
        return x


class TransXNetStage(nn.Module):
    """``downsample`` -> blocks, all sharing the stage's relative position bias (resized once to the map)."""

    no_weight_decay_keys = ("relative_pos_enc",)

    def __init__(self, blocks: Sequence[TransXNetBlock], downsample: Optional[nn.Module],
                 rel_pos_size: Tuple[int, int, int, int], sr_ratio: int):
        super().__init__()
        self.grad_checkpointing = False
        self.sr_ratio = sr_ratio
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)  # called one by one with the shared bias
        self.relative_pos_enc = nn.Parameter(torch.zeros(rel_pos_size))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward(self, x):
        x = self.downsample(x)
        H, W = x.shape[-2], x.shape[-1]
        sr = self.sr_ratio
        if sr > 1:  # keys grid of OSRA's conv (kernel sr+3, stride sr, padding (sr+3)//2)
            pad, k = (sr + 3) // 2, sr + 3
            kh, kw = (H + 2 * pad - k) // sr + 1, (W + 2 * pad - k) // sr + 1
        else:
            kh, kw = H, W
        rel = resize_rel_pos(self.relative_pos_enc, H * W, kh * kw)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, rel)
            else:
                x = blk(x, rel)
        return x


class TransXNet(MetaFormerBase):
    """TransXNet on the zoo skeleton.

    Args:
        img_size: size the relative position biases are built for (official ``image_size``, 224); any input runs.
        depths, dims, kernel_sizes, num_groups, sr_ratios, num_heads, mlp_ratios: per stage (see ``SPEC``).
        layer_scale_init_value: LayerScale init (official 1e-5; None disables it).
        drop_rate: dropout inside the MS-FFN (official ``drop_rate``); drop_path_rate: stochastic depth, linear over
            all blocks.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (3, 3, 9, 3),
            dims: Sequence[int] = (48, 96, 224, 448),
            kernel_sizes: Sequence[int] = (7, 7, 7, 7),
            num_groups: Sequence[int] = (2, 2, 2, 2),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            layer_scale_init_value: Optional[float] = 1e-5,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size
        self.stem = ConvBN(in_chans, dims[0], kernel_size=7, stride=4, padding=3)
        feat = [math.ceil(img_size[0] / 4), math.ceil(img_size[1] / 4)]
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
        stages, idx = [], 0
        for i, depth in enumerate(depths):
            downsample = None
            if i > 0:
                downsample = ConvBN(dims[i - 1], dims[i], kernel_size=3, stride=2, padding=1)
                feat = [math.ceil(feat[0] / 2), math.ceil(feat[1] / 2)]
            blocks = [
                TransXNetBlock(dims[i], kernel_size=kernel_sizes[i], sr_ratio=sr_ratios[i],
                               num_groups=num_groups[i], num_heads=num_heads[i], mlp_ratio=mlp_ratios[i],
                               drop=drop_rate, drop_path=dpr[idx + j], layer_scale_init_value=layer_scale_init_value)
                for j in range(depth)
            ]
            idx += depth
            stages.append(TransXNetStage(blocks, downsample, rel_pos_shape(feat, num_heads[i], sr_ratios[i]),
                                         sr_ratios[i]))
        self.stages = nn.Sequential(*stages)
        self._init_interface(in_chans, num_classes, dims)
        # any size >= 32 px runs (every map size is computed with ceil); checked by the trunk's input_check
        self.min_input_size = 32
        self.input_divisor = 1
        self.head = MetaFormerHead(self.num_features, num_classes, global_pool=global_pool, norm_layer="groupnorm1",
                                   norm_first=True)
        self.apply(self._init_weights)

    # init: the official one (every Conv2d trunc-normal 0.02, zero bias; the classifier conv too, a Linear here) is the
    # skeleton's ``MetaFormerBase._init_weights``

    # group_matcher: the per-stage relative position bias goes with the stage's downsampling (layer decay)
    stage_param_pattern = r"downsample|relative_pos_enc"


# --- official checkpoint layout ----------------------------------------------------------------------------------
_OFFICIAL_RULES = [
    (r"^patch_embed\.proj\.", "stem."),
    *[(rf"^network\.{2 * i}\.(\d+)\.", rf"stages.{i}.blocks.\1.") for i in range(4)],
    *[(rf"^network\.{2 * i - 1}\.proj\.", f"stages.{i}.downsample.") for i in (1, 2, 3)],
    (r"^relative_pos_enc\.(\d)$", r"stages.\1.relative_pos_enc"),
    (r"^classifier\.0\.", "head.norm."),
    (r"^classifier\.2\.", "head.fc."),
]

_TO_OFFICIAL = [
    (r"^stem\.", "patch_embed.proj."),
    *[(rf"^stages\.{i}\.blocks\.(\d+)\.", rf"network.{2 * i}.\1.") for i in range(4)],
    *[(rf"^stages\.{i}\.downsample\.", f"network.{2 * i - 1}.proj.") for i in (1, 2, 3)],
    (r"^stages\.(\d)\.relative_pos_enc$", r"relative_pos_enc.\1"),
    (r"^head\.norm\.", "classifier.0."),
    (r"^head\.fc\.", "classifier.2."),
]


def checkpoint_filter_fn(state_dict, model: TransXNet) -> Dict[str, torch.Tensor]:
    """Official LMMMEng/TransXNet checkpoint (timm ``CheckpointSaver`` file: weights under ``state_dict``; a raw state
    dict works too) -> zoo layout, validated.

    The classifier 1x1 conv becomes the Linear head; relative position biases built for another ``image_size`` are
    resized with the official runtime rule (so e.g. 224-built weights in an ``img_size=384`` model give the outputs of
    the 224-built model at 384 px).
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_official_layout(state_dict, "TransXNet", "stem.conv.weight",
                          ("patch_embed.proj.conv.weight", "network.0.0.token_mixer..."), "official LMMMEng/TransXNet"):
        if any(k.startswith(("norm0.", "norm2.", "norm4.", "norm6.")) for k in state_dict):
            raise CheckpointError(
                "this is a TransXNet dense-prediction backbone (fork_feat: per-output norm0/2/4/6, no classifier); "
                "load it through the dense adapter (metaformer_zoo.dense), not into the classification model")
        state_dict = remap_keys(state_dict, _OFFICIAL_RULES)
    state_dict = dict(state_dict)
    target = model.state_dict()
    for k, v in list(state_dict.items()):
        t = target.get(k)
        if t is None:
            continue
        if k.startswith("head.fc.weight") and v.dim() == 4 and t.dim() == 2:
            state_dict[k] = v.flatten(1)
        elif k.endswith("relative_pos_enc") and v.dim() == 4 and v.shape != t.shape and v.shape[:2] == t.shape[:2]:
            state_dict[k] = resize_rel_pos(v.float(), int(t.shape[2]), int(t.shape[3])).to(v.dtype)
    return validate_state_dict(state_dict, model, source="checkpoint (LMMMEng/TransXNet layout)")


def official_state_dict(model: TransXNet) -> Dict[str, torch.Tensor]:
    """The model's weights in the official LMMMEng/TransXNet layout (the tensors under ``state_dict``)."""
    out = {}
    for k, v in remap_keys(model.state_dict(), _TO_OFFICIAL).items():
        if k == "classifier.2.weight" and v.dim() == 2:
            v = v[:, :, None, None]
        out[k] = v.clone()
    return out


# --- declaration -------------------------------------------------------------------------------------------------
CITATION = """@article{lou2025transxnet,
  title={TransXNet: Learning Both Global and Local Dynamics with a Dual Dynamic Token Mixer for Visual Recognition},
  author={Lou, Meng and Zhang, Shu and Zhou, Hong-Yu and Yang, Sibei and Wu, Chuan and Yu, Yizhou},
  journal={IEEE Transactions on Neural Networks and Learning Systems},
  year={2025}
}"""

_URL = "https://github.com/LMMMEng/TransXNet/releases/download/v1.0/{}.pth.tar"

SPEC = FamilySpec(
    name="transxnet",
    model_cls=TransXNet,
    arxiv="2310.19380",
    code="https://github.com/LMMMEng/TransXNet",
    license="apache-2.0",
    citation=CITATION,
    cfg=dict(crop_pct=0.9),
    # official files are timm CheckpointSaver dicts (weights under ``state_dict``, EMA weights under ``state_dict_ema``,
    # read first as timm does; the pickled training argparse.Namespace is allowed by the safe reader)
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict, wrapper="state_dict"),
    # official ``fork_feat=True``: GroupNorm(1, C), eps 1e-5, affine, on every output (official keys norm0/2/4/6);
    # the official RetinaNet configs (``start_level=1``) make the first one Identity: adapter ``out_norm_skip=(0,)``
    dense_out_norms=(dict(type="groupnorm", num_groups=1, eps=1e-5),) * 4,
    recipe="transxnet",
    card="transxnet",
    notes="any input size; batch-1 training supported",
    models=(
        Variant("transxnet_t", dict(depths=(3, 3, 9, 3), dims=(48, 96, 224, 448), kernel_sizes=(7, 7, 7, 7),
                                    num_groups=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), num_heads=(1, 2, 4, 8),
                                    mlp_ratios=(4, 4, 4, 4), layer_scale_init_value=1e-5),
                params=12_834_808, macs=1_803_615_280, top1=81.6, top1_source="LMMMEng/TransXNet README",
                tags={"in1k": dict(url=_URL.format("transx-t"))}),
        Variant("transxnet_s", dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), kernel_sizes=(7, 7, 7, 7),
                                    num_groups=(2, 2, 3, 4), sr_ratios=(8, 4, 2, 1), num_heads=(1, 2, 5, 8),
                                    mlp_ratios=(6, 6, 4, 4), layer_scale_init_value=1e-5),
                params=26_864_068, macs=4_600_344_576, top1=83.8, top1_source="LMMMEng/TransXNet README",
                tags={"in1k": dict(url=_URL.format("transx-s"))}),
        Variant("transxnet_b", dict(depths=(4, 4, 21, 4), dims=(76, 152, 336, 672), kernel_sizes=(7, 7, 7, 7),
                                    num_groups=(2, 2, 4, 4), sr_ratios=(8, 4, 2, 1), num_heads=(2, 4, 8, 16),
                                    mlp_ratios=(8, 8, 4, 4), layer_scale_init_value=1e-5),
                params=48_009_002, macs=8_342_525_168, top1=84.6, top1_source="LMMMEng/TransXNet README",
                tags={"in1k": dict(url=_URL.format("transx-b"), crop_pct=0.95),
                      # README: B fine-tuned at 384 (85.5); whether the file holds 224- or 384-sized relative position
                      # tables is unknown: the filter resizes them to the model's img_size either way (create with
                      # img_size=384 to keep them)
                      "in1k_384": dict(url=_URL.format("transx-b-384"), input_size=(3, 384, 384),
                                       pool_size=(12, 12), crop_pct=1.0)}),
    ),
)
register_family(SPEC, __name__)

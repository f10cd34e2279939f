"""ViM2 / Vision MambaMixer (MambaMixer: Efficient Selective State Space Models with Dual Token and Channel Selection,
arXiv 2403.19888 v1, Behrouz, Santacatterina, Zabih).

There is no official code (the MambaMixer/M2 repository only says "Codes and models will be available soon"): this
is a reconstruction from the paper, with every open point decided as in ``reference/vim2_scan.md`` §1.4 and recorded
in ``model_cards/vim2.md``. In short:

* stem Conv 4x4/4 -> LN; stages 2-4 start with VMamba-v0 PatchMerging2D (2x2 concat -> LN(4C) -> Linear 4C -> 2C);
  final LN -> average pool -> Linear (VMamba-v0 pipeline).
* a stage holds L "MambaMixer layers"; layer l = [SS2D block -> SS2D block] (the Selective Token Mixer) then one
  Selective Channel Mixer block; every block is pre-norm residual ``y = x + DropPath(mixer(LN(x)))``.
* weighted averaging of earlier features inside each stage (paper §3.2)::

      x_T(l) = sum_{i<l} alpha_{l,i} y_T(i) + sum_{i<l} beta_{l,i} y_C(i)
      x_C(l) = sum_{i<=l} theta_{l,i} y_T(i) + sum_{i<l} gamma_{l,i} y_C(i),   y_T(0) = y_C(0) = stage input

  learnable scalars, no softmax, identity init (a plain sequential stack at init), no weight decay.

Vocabulary: ``depths`` counts a stage's blocks as every zoo family does, i.e. its MambaMixer layers
(``stages.i.blocks.j`` is layer j + 1); ``token_blocks`` is the number of SS2D blocks inside each layer (2).

Why not a spec over the skeleton's ``MetaFormer``: a stage is not a sequence of blocks; every layer reads a learned
weighted sum of all earlier token- and channel-mixer outputs of its stage, so the stage keeps its own module
(``Vim2Stage``) inside ``MetaFormerBase`` (features, ``forward_intermediates``, ``group_matcher`` come from there);
the token and channel blocks themselves are the skeleton's ``MetaFormerBlock``.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, calculate_drop_path_rates, trunc_normal_
from timm.models import checkpoint, register_notrace_function

from ..checkpoint import is_official_layout, unwrap_state_dict, validate_state_dict
from ..mixers.vim2 import SS2D, SelectiveChannelMixer
from ..skeleton import MetaFormerBase, MetaFormerBlock, MetaFormerHead, to_stage_list
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family

__all__ = ["Vim2", "Vim2Layer", "Vim2Stage", "PatchMerging2d", "checkpoint_filter_fn", "SPEC"]

LN_EPS = 1e-5  # VMamba uses nn.LayerNorm defaults everywhere


def _ln2d(dim: int) -> nn.Module:
    return LayerNorm2d(dim, eps=LN_EPS)


class Vim2Stem(nn.Module):
    """Conv 4x4 stride 4 (bias) -> channel LayerNorm (VMamba-v0 patch embedding)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = _ln2d(dim)

    def forward(self, x):
        return self.norm(self.conv(x))


@register_notrace_function
def pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad an NCHW map at the bottom/right to even H and W (VMamba PatchMerging2D)."""
    H, W = x.shape[-2], x.shape[-1]
    if H % 2 != 0 or W % 2 != 0:
        x = F.pad(x, (0, W % 2, 0, H % 2))
    return x


class PatchMerging2d(nn.Module):
    """VMamba-v0 / Swin patch merging on NCHW: 2x2 neighbourhood concat (Swin order) -> LN(4C) -> Linear 4C -> out.

    Odd H or W is zero-padded at the bottom/right first (as VMamba does), so any input size works.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=LN_EPS)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x):
        x = pad_to_even(x)
        x = torch.cat([x[..., 0::2, 0::2], x[..., 1::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 1::2]], dim=1)
        x = self.reduction(self.norm(x.permute(0, 2, 3, 1)))
        return x.permute(0, 3, 1, 2)


def _wsum(w: torch.Tensor, ys: List[torch.Tensor]) -> torch.Tensor:
    out = ys[0] * w[0]
    for i in range(1, len(ys)):
        out = torch.addcmul(out, ys[i], w[i])
    return out


class Vim2Layer(nn.Module):
    """One MambaMixer layer l (1-based) of a stage: weighted input -> token blocks; weighted input -> channel block.

    ``alpha`` (l,), ``beta`` (l,), ``theta`` (l+1,), ``gamma`` (l,) are the paper's learnable averaging scalars over
    the stage's earlier outputs (index 0 = the stage input). Identity init (DenseFormer style): layer 1 reads
    alpha_{1,0} = 1, later layers beta_{l,l-1} = 1 (the previous channel-mixer output), and theta_{l,l} = 1.
    """

    no_weight_decay_keys = ("alpha", "beta", "theta", "gamma")

    def __init__(self, layer_idx: int, token_blocks: Sequence[nn.Module], channel_block: nn.Module):
        super().__init__()
        if layer_idx < 1:
            raise ValueError(f"layer_idx is 1-based, got {layer_idx}")
        self.layer_idx = layer_idx
        l = layer_idx
        self.alpha = nn.Parameter(torch.zeros(l))
        self.beta = nn.Parameter(torch.zeros(l))
        self.theta = nn.Parameter(torch.zeros(l + 1))
        self.gamma = nn.Parameter(torch.zeros(l))
        self.token_blocks = nn.Sequential(*token_blocks)
        self.channel_block = channel_block
        self.reset_averaging()

    @torch.no_grad()
    def reset_averaging(self):
        l = self.layer_idx
        for p in (self.alpha, self.beta, self.theta, self.gamma):
            p.zero_()
        if l == 1:
            self.alpha[0] = 1.0
        else:
            self.beta[l - 1] = 1.0
        self.theta[l] = 1.0

    def forward(self, hist_t: List[torch.Tensor], hist_c: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        x_t = _wsum(self.alpha, hist_t) + _wsum(self.beta, hist_c)
        y_t = self.token_blocks(x_t)
        x_c = _wsum(self.theta, hist_t + [y_t]) + _wsum(self.gamma, hist_c)
        y_c = self.channel_block(x_c)
        return y_t, y_c


class Vim2Stage(nn.Module):
    """``downsample`` then the stage's ``blocks`` (``Vim2Layer``s) with weighted averaging; NCHW in and out.

    Every layer output stays alive until the end of the stage (the averaging reads them all); with
    ``set_grad_checkpointing`` each layer is recomputed in backward so only the layer outputs are stored.
    """

    def __init__(self, layers: Sequence[Vim2Layer], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(layers)  # layers take the history lists: iterated, never called in sequence

    @classmethod
    def build(cls, dim: int, num_layers: int, token_per_layer: int = 2, in_dim: Optional[int] = None,
              drop_path: Union[float, Sequence[float]] = 0., d_state: int = 16, ssm_ratio: float = 2.0,
              channel_expand: float = 2.0, channel_group: int = 16, proj_drop: float = 0.,
              backend: str = "auto") -> "Vim2Stage":
        """A ViM2 stage on its own: ``num_layers`` x ([SS2D block] * token_per_layer -> channel-mixer block),
        preceded by PatchMerging2d from ``in_dim`` channels when given. ``drop_path``: one rate, or one per block
        (token_per_layer + 1 per layer, in order)."""
        n_blocks = num_layers * (token_per_layer + 1)
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [float(drop_path)] * n_blocks
        if len(rates) != n_blocks:
            raise ValueError(f"drop_path has {len(rates)} rates but the stage has {n_blocks} blocks")
        rates = iter(rates)
        vim2_layers = []
        for l in range(num_layers):
            token_blocks = [
                MetaFormerBlock(dim, SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, proj_drop=proj_drop,
                                          backend=backend),
                                mlp=None, norm_layer=_ln2d, drop_path=next(rates))
                for _ in range(token_per_layer)
            ]
            channel_block = MetaFormerBlock(
                dim, SelectiveChannelMixer(dim, expand=channel_expand, group_size=channel_group, d_state=d_state,
                                           proj_drop=proj_drop, backend=backend),
                mlp=None, norm_layer=_ln2d, drop_path=next(rates))
            vim2_layers.append(Vim2Layer(l + 1, token_blocks, channel_block))
        return cls(vim2_layers, PatchMerging2d(in_dim, dim) if in_dim is not None else None)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward(self, x):
        x = self.downsample(x)
        hist_t: List[torch.Tensor] = [x]
        hist_c: List[torch.Tensor] = [x]
        for layer in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                y_t, y_c = checkpoint(layer, hist_t, hist_c)
            else:
                y_t, y_c = layer(hist_t, hist_c)
            hist_t = hist_t + [y_t]
            hist_c = hist_c + [y_c]
        return hist_c[-1]


class Vim2(MetaFormerBase):
    r"""ViM2 (Vision MambaMixer), reconstructed; see the module docstring and ``model_cards/vim2.md``.

    Args:
        depths: MambaMixer layers (= channel mixers, the stage's ``blocks``) per stage.
        token_blocks: SS2D (Selective Token Mixer) blocks in each layer, one for every stage or one per stage; a
            stage has ``token_blocks * depths[i]`` SS2D blocks.
        dims: channels per stage. d_state, ssm_ratio: SS2D's N and expansion. channel_expand, channel_group: channel
        mixer width (2C) and step width g. drop_path_rate: linear over all mixer blocks in order.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            depths: Sequence[int] = (1, 1, 3, 1),
            token_blocks: Union[int, Sequence[int]] = 2,
            dims: Sequence[int] = (96, 192, 384, 768),
            d_state: int = 16,
            ssm_ratio: float = 2.0,
            channel_expand: float = 2.0,
            channel_group: int = 16,
            drop_path_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_rate: float = 0.,
            backend: str = "auto",
    ):
        super().__init__()
        num_stages = len(dims)
        if len(depths) != num_stages:
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must have one entry per stage")
        token_per_layer = to_stage_list(token_blocks, num_stages, "token_blocks")
        if any(l < 1 for l in depths) or any(t < 1 for t in token_per_layer):
            raise ValueError(f"every stage needs at least one MambaMixer layer with at least one SS2D block, got "
                             f"depths {tuple(depths)} and token_blocks {token_blocks}")
        self.stem = Vim2Stem(in_chans, dims[0])
        # stochastic depth over every mixer block in order (token_blocks SS2D blocks + 1 channel mixer per layer)
        dpr = calculate_drop_path_rates(drop_path_rate, [l * (t + 1) for l, t in zip(depths, token_per_layer)],
                                        stagewise=True)
        self.stages = nn.Sequential(*[
            Vim2Stage.build(dims[i], depths[i], token_per_layer[i], in_dim=dims[i - 1] if i > 0 else None,
                            drop_path=dpr[i], d_state=d_state, ssm_ratio=ssm_ratio, channel_expand=channel_expand,
                            channel_group=channel_group, proj_drop=proj_drop_rate, backend=backend)
            for i in range(num_stages)
        ])
        self._init_interface(in_chans, num_classes, dims, reductions=[2 ** (i + 2) for i in range(num_stages)])
        self.head = MetaFormerHead(self.num_features, num_classes, global_pool=global_pool, norm_layer=_ln2d,
                                   norm_first=True, drop_rate=drop_rate)
        self.apply(self._init_weights)
        for m in self.modules():  # the mixers' own (Mamba) init of their projections and SSM parameters
            if isinstance(m, (SS2D, SelectiveChannelMixer)):
                m.reset_parameters()

    @staticmethod
    def _init_weights(m):
        # VMamba VSSM._init_weights: Linear trunc_normal(.02) / zero bias, LayerNorm (1, 0); convs keep torch defaults
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints: there is no official ViM2 checkpoint; the filter only validates zoo-layout state dicts
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict, model: Vim2):
    """Zoo-layout ViM2 checkpoint (optionally wrapped) -> validated state dict. No official layout exists."""
    state_dict = unwrap_state_dict(state_dict)
    is_official_layout(state_dict, "ViM2", "stem.conv.weight",  # no official layout: raises unless zoo keys
                       hint="ViM2 has no official checkpoint, so only zoo-trained weights load. Is this a checkpoint "
                            "of another family?")
    return validate_state_dict(state_dict, model, source="checkpoint (metaformer_zoo ViM2 layout)")


CITATION = """@article{behrouz2024mambamixer,
  title   = {MambaMixer: Efficient Selective State Space Models with Dual Token and Channel Selection},
  author  = {Behrouz, Ali and Santacatterina, Michele and Zabih, Ramin},
  journal = {arXiv preprint arXiv:2403.19888},
  year    = {2024}
}"""

_TOP1_SOURCE = "paper arXiv 2403.19888v1 (preliminary; zoo model is a reconstruction; no code or weights)"

# variants: dims and drop path of VMamba-v0 vanilla_vmamba_*; depths = MambaMixer layers per stage (reference
# vim2_scan.md §1.6), 2 SS2D blocks each. params / MACs are the reconstruction's (the paper's 20 / 43 / 74 M differ,
# see the card); no weights exist (tag "untrained").
SPEC = FamilySpec(
    name="vim2", model_cls=Vim2,
    code="https://github.com/MambaMixer/M2",
    license="apache-2.0", citation=CITATION,
    cfg=dict(url=""),
    # no official code or checkpoint: the filter validates zoo-layout checkpoints only
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=None, wrapper=None),
    # VMamba's dense backbone (Backbone_VSSM) puts a LayerNorm ``outnorm{i}`` (nn.LayerNorm default eps) on every
    # returned stage output
    dense_out_norms=(dict(type="layernorm2d", eps=LN_EPS),) * 4,
    recipe="vim2", card="vim2",
    notes="Reconstruction: https://github.com/MambaMixer/M2 holds only a README, so there is no official code or "
          "checkpoint; the filter validates zoo-layout checkpoints only and to_official is None.",
    models=(
        Variant("vim2_tiny", dict(depths=(1, 1, 3, 1), dims=(96, 192, 384, 768), drop_path_rate=0.2),
                params=23_635_954, macs=4_056_443_904, top1=82.7, top1_source=_TOP1_SOURCE,
                tags={"untrained": {}}),
        Variant("vim2_small", dict(depths=(1, 1, 9, 1), dims=(96, 192, 384, 768), drop_path_rate=0.3),
                params=41_541_268, macs=7_649_246_208, top1=83.7, top1_source=_TOP1_SOURCE,
                tags={"untrained": {}}),
        Variant("vim2_base", dict(depths=(1, 1, 9, 1), dims=(128, 256, 512, 1024), drop_path_rate=0.6),
                params=71_771_956, macs=13_050_597_376, top1=83.9, top1_source=_TOP1_SOURCE,
                tags={"untrained": {}}),
    ),
)
register_family(SPEC, __name__)

"""The shared MetaFormer skeleton: stem -> stages of [downsample, blocks] -> head.

Every zoo family is built on these pieces:

* ``MetaFormerBase`` holds the timm model interface (``forward_features``, ``forward_head``, ``forward_intermediates``,
  ``prune_intermediate_layers``, ``reset_classifier``, ``set_grad_checkpointing``, ``group_matcher``,
  ``no_weight_decay``, ``feature_info``) and the input checks, for any model that sets ``stem``, ``stages`` (an
  ``nn.Sequential`` of stage modules mapping NCHW -> NCHW, each with ``downsample`` and ``blocks``) and ``head``.
* ``MetaFormerStage``, ``MetaFormerBlock`` and ``MetaFormerHead`` are the generic parts. Families whose block or
  stage does not fit (e.g. ViM2's weighted averaging) provide their own stage module with the same interface.
* ``MetaFormer`` is the spec-driven model: depths, dims and one token mixer per stage, given by name from the mixer
  registry (``metaformer_zoo.mixers``), so mixers of different families compose freely. Its state-dict layout is
  timm's MetaFormer layout (``stem.conv``, ``stages.i.downsample``, ``stages.i.blocks.j.token_mixer``, ``head.fc``).
"""
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, SelectAdaptivePool2d, calculate_drop_path_rates, trunc_normal_
from timm.models import checkpoint, checkpoint_seq, register_notrace_function
from timm.models._features import feature_take_indices
from timm.models.metaformer import Downsampling, MlpHead, Scale, Stem
from torch.fx.node import has_side_effect

from .layers import get_act, get_norm
from .mixers import check_mixer_kwargs, create_mixer

__all__ = [
    "MetaFormerBase", "MetaFormer", "MetaFormerStage", "MetaFormerBlock", "MetaFormerHead", "InputCheck",
    "check_input", "drop_path_rates", "make_mlp", "to_stage_list",
]


@has_side_effect
@register_notrace_function
def check_input(
        x: torch.Tensor,
        in_chans: int,
        min_size: int,
        divisor: int,
        model_name: str,
) -> None:
    """Raise a ValueError naming the problem when an input batch cannot go through the model.

    A leaf in FX graphs (``register_notrace_function``), kept by dead-code elimination like ``torch._assert``
    (``has_side_effect``), so FX feature extractors (``create_feature_extractor``, ``feature_cls="fx"``) check too.
    """
    if x.dim() != 4:
        raise ValueError(f"{model_name} expects a 4-D (B, C, H, W) image batch, got shape {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{model_name} was built for {in_chans} input channels but got {x.shape[1]} "
            f"(input shape {list(x.shape)}). Create the model with in_chans={x.shape[1]} "
            f"(timm adapts pretrained first-conv weights), or convert the images to {in_chans} channels."
        )
    H, W = x.shape[-2], x.shape[-1]
    if H < min_size or W < min_size:
        raise ValueError(
            f"input {H}x{W} is too small for {model_name}: the minimum is {min_size}x{min_size} "
            f"(the network downsamples by 32). Upsample the images."
        )
    if divisor > 1 and (H % divisor != 0 or W % divisor != 0):
        raise ValueError(
            f"input {H}x{W} does not work with {model_name}: height and width must be multiples of {divisor}. "
            f"Resize or pad the images to a multiple of {divisor} (e.g. {int(math.ceil(H / divisor)) * divisor}x"
            f"{int(math.ceil(W / divisor)) * divisor})."
        )


class InputCheck(nn.Module):
    """Parameter-free first module of every zoo trunk: ``check_input`` on the batch, which it returns unchanged.

    ``MetaFormerBase`` registers it as the model's first child, so the checks run on every path into the trunk:
    ``forward`` / ``forward_features`` / ``forward_intermediates`` call it, and timm's ``features_only`` wrappers that
    call the model's children in order (``FeatureListNet`` / ``FeatureDictNet``, hook nets with rewriting) run it
    before the stem. It holds no parameters or buffers, so state dicts are unchanged.
    """

    def __init__(self, in_chans: int = 3, min_size: int = 32, divisor: int = 1, model_name: str = "model"):
        super().__init__()
        self.in_chans = int(in_chans)
        self.min_size = int(min_size)
        self.divisor = int(divisor)
        self.model_name = str(model_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, self.min_size, self.divisor, self.model_name)
        return x

    def extra_repr(self) -> str:
        return f"in_chans={self.in_chans}, min_size={self.min_size}, divisor={self.divisor}"


def to_stage_list(value: Any, num_stages: int, name: str) -> list:
    """Broadcast a per-model value to one value per stage, checking the length of per-stage lists."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f"{name} has {len(value)} entries but the model has {num_stages} stages")
        return list(value)
    return [value] * num_stages


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> List[List[float]]:
    """Stochastic depth rising linearly over all blocks (``linspace(0, rate, sum(depths))``), split per stage: timm's
    ``calculate_drop_path_rates`` in its per-stage-list form."""
    return calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)


def make_mlp(dim: int, mlp_ratio: float, act_layer: Union[str, Callable] = "gelu", bias: bool = True,
             drop: float = 0.) -> Mlp:
    """The channel MLP on a 2D map (1x1 convs): keys ``fc1``, ``act``, ``fc2`` as in timm / the official code."""
    return Mlp(dim, int(mlp_ratio * dim), act_layer=get_act(act_layer), bias=bias, drop=drop, use_conv=True)


class MetaFormerBlock(nn.Module):
    """``x = res_scale1(x) + layer_scale1(drop_path(token_mixer(norm1(x))))``, then the same with ``mlp``/``norm2``.

    ``token_mixer`` and ``mlp`` are modules on (B, C, H, W) maps; ``mlp=None`` gives a mixer-only block.
    """

    def __init__(
            self,
            dim: int,
            token_mixer: nn.Module,
            mlp: Optional[nn.Module] = None,
            norm_layer: Union[str, Callable] = "layernorm2d_nobias",
            drop_path: float = 0.,
            layer_scale_init_value: Optional[float] = None,
            res_scale_init_value: Optional[float] = None,
    ):
        super().__init__()
        norm_layer = get_norm(norm_layer)
        ls = lambda: Scale(dim, layer_scale_init_value) if layer_scale_init_value is not None else nn.Identity()  # noqa
        rs = lambda: Scale(dim, res_scale_init_value) if res_scale_init_value is not None else nn.Identity()  # noqa
        self.norm1 = norm_layer(dim) if norm_layer else nn.Identity()
        self.token_mixer = token_mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.layer_scale1 = ls()
        self.res_scale1 = rs()
        if mlp is not None:
            self.norm2 = norm_layer(dim) if norm_layer else nn.Identity()
            self.mlp = mlp
            self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
            self.layer_scale2 = ls()
            self.res_scale2 = rs()
        else:
            self.mlp = None

    def forward(self, x):
        x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
        if self.mlp is not None:
            x = self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))
        return x


class MetaFormerStage(nn.Module):
    """``downsample`` (Identity in the first stage) followed by ``blocks``, NCHW in and out."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward(self, x):
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class MetaFormerHead(nn.Module):
    """Classifier head: ``global_pool -> norm -> flatten -> drop -> fc`` (timm's MetaFormer key layout).

    ``norm_first=True`` applies the norm to the unpooled map before pooling (official PoolFormer v1, iFormer).
    ``mlp_ratio`` builds the Conv/CAFormer MLP head (fc1 -> SquaredReLU -> LN(eps 1e-5) -> head dropout -> fc2) as
    ``fc``; otherwise ``fc`` is a Linear.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int = 1000,
            global_pool: str = "avg",
            norm_layer: Union[str, Callable, None] = "layernorm2d",
            norm_first: bool = False,
            mlp_ratio: Optional[float] = None,
            head_dropout: float = 0.,
            drop_rate: float = 0.,
    ):
        super().__init__()
        self.in_features = in_features
        self.mlp_ratio = mlp_ratio
        self.head_dropout = head_dropout
        self.norm_first = norm_first
        norm_layer = get_norm(norm_layer)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.norm = norm_layer(in_features) if norm_layer else nn.Identity()
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._make_fc(num_classes)

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.mlp_ratio:
            return MlpHead(self.in_features, num_classes, mlp_ratio=self.mlp_ratio,
                           norm_layer=partial(nn.LayerNorm, eps=1e-5), drop_rate=self.head_dropout)
        return nn.Linear(self.in_features, num_classes)

    def reset(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        if reset_other:
            self.norm = nn.Identity()
        self.fc = self._make_fc(num_classes)

    def forward(self, x, pre_logits: bool = False):
        if self.norm_first:
            x = self.norm(x)
            x = self.global_pool(x)
        else:
            x = self.global_pool(x)
            x = self.norm(x)
        x = self.flatten(x)
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class MetaFormerBase(nn.Module):
    """timm model interface shared by every zoo family.

    Subclasses call ``super().__init__()`` first, build ``self.stem``, ``self.stages`` (``nn.Sequential``; stage ``i``
    outputs stride ``feature_info[i]['reduction']``) and ``self.head`` (a ``MetaFormerHead`` or anything with
    ``reset`` and ``forward(x, pre_logits)``), and call ``_init_interface``. Families with constraints on the input set
    ``self.min_input_size`` / ``self.input_divisor`` (defaults 32 / 1; assignable any time, they live on the
    ``input_check`` module); fixed-size models raise from their size-dependent modules.
    """

    # the size rules live on ``self.input_check``; TorchScript only sees that module's attributes
    __jit_unused_properties__ = ["min_input_size", "input_divisor"]

    def __init__(self):
        super().__init__()
        # the first child, so that timm's feature wrappers (which call the children in order) check the input too
        self.input_check = InputCheck()

    @property
    def min_input_size(self) -> int:
        """Smallest input height / width the model accepts."""
        return self.input_check.min_size

    @min_input_size.setter
    def min_input_size(self, value: int):
        self.input_check.min_size = int(value)

    @property
    def input_divisor(self) -> int:
        """Input height and width must be multiples of this (1 = any size)."""
        return self.input_check.divisor

    @input_divisor.setter
    def input_divisor(self, value: int):
        self.input_check.divisor = int(value)

    @staticmethod
    def _init_weights(m: nn.Module):
        """The init hook subclasses ``apply``: every Conv2d / Linear trunc-normal 0.02 with zero bias (the MetaFormer,
        iFormer and TransXNet official init); families with another official init override it."""
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _init_interface(self, in_chans: int, num_classes: int, dims: Sequence[int],
                        reductions: Sequence[int] = (4, 8, 16, 32), head_hidden_size: Optional[int] = None):
        self.arch_name = type(self).__name__
        self.input_check.in_chans = int(in_chans)
        self.input_check.model_name = self.arch_name
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.head_hidden_size = head_hidden_size or self.num_features
        self.grad_checkpointing = False
        # forward_intermediates output 0 is the stem output instead of stage 0's (RaftMLP, as its dense wrappers)
        self.stem_is_first_feature = False
        self.feature_info = [
            dict(num_chs=d, reduction=r, module=f"stages.{i}") for i, (d, r) in enumerate(zip(dims, reductions))
        ]

    # --- input checks ---------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor):
        """Raise a ValueError naming the problem (channels, rank, size) before ``x`` reaches the stem."""
        self.input_check(x)

    # --- timm interface -------------------------------------------------------------------------------------------
    # group_matcher: the last group (after every stage), e.g. AFFNet's ``r"^final_conv"``
    final_group_pattern: str = r"^head\.norm"
    # group_matcher: a stage's own parameters outside its blocks (e.g. iFormer's ``pos_embed``), grouped with the
    # stage's downsampling (first layer of the stage for layer decay)
    stage_param_pattern: str = r"downsample"

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (rf"^stages\.(\d+)\.(?:{self.stage_param_pattern})", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (self.final_group_pattern, (99999,)),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of parameters to keep out of weight decay.

        Collected from modules that list their own parameter names in a ``no_weight_decay_keys`` attribute
        (positional tables, relative position biases, SSM parameters, averaging weights ...) plus every layer/res
        scale. timm's optimizer factory additionally skips all 1-D parameters (norms, biases).
        """
        names = set()
        for mod_name, mod in self.named_modules():
            keys = getattr(mod, "no_weight_decay_keys", ())
            if isinstance(mod, Scale):
                keys = tuple(keys) + ("scale",)
            for k in keys:
                full = f"{mod_name}.{k}" if mod_name else k
                names.add(full)
        params = dict(self.named_parameters())
        return {n for n in names if n in params}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            if hasattr(stage, "set_grad_checkpointing"):
                stage.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW, strides per ``feature_info``) and, unless ``intermediates_only``, the final map.

        ``indices``: last n stages if int, all if None, the listed stages if a sequence. Families hook in through
        ``_forward_stages`` (the stage loop, e.g. cross-stage shortcuts), ``stem_is_first_feature`` (output 0 is the
        stem output) and ``_forward_final`` (applied to the final map after the last stage).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; zoo models return NCHW intermediates")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = max_index if stop_early and not torch.jit.is_scripting() else len(self.stages) - 1
        x = self.stem(x)
        x, intermediates = self._forward_stages(x, list(take_indices), last)
        if intermediates_only:
            return intermediates
        if last == len(self.stages) - 1:
            x = self._forward_final(x)
        return x, intermediates

    def _forward_stages(self, x: torch.Tensor, take: List[int], last: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stages ``0 .. last`` on the stem output; returns the last stage's output and the outputs listed in ``take``
        (output 0 is the stem output when ``stem_is_first_feature``). Override for stage wiring beyond a chain."""
        feats: List[torch.Tensor] = []
        if self.stem_is_first_feature and 0 in take:
            feats.append(x)
        for i, stage in enumerate(self.stages):
            if i <= last:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(stage, x)
                else:
                    x = stage(x)
                if i in take and not (i == 0 and self.stem_is_first_feature):
                    feats.append(x)
        return x, feats

    def _forward_final(self, x: torch.Tensor) -> torch.Tensor:
        """Applied to the last stage's output in ``forward_features`` (e.g. AFFNet's 1x1 expansion); default: none."""
        return x

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Drop the stages (and head) not needed for the requested intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self._forward_final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class MetaFormer(MetaFormerBase):
    r"""Spec-driven MetaFormer (MetaFormer Baselines, arXiv 2210.13452) with one token mixer per stage.

    Args:
        depths, dims: blocks and channels per stage.
        token_mixers: per-stage mixer names from the mixer registry (``metaformer_zoo.mixers.list_mixers()``), or
            classes/factories taking ``dim``; a single value applies to every stage. A stage's entry may itself be
            a list with one mixer per block (e.g. an exported ``zoo_supernet`` placement).
        mixer_kwargs: dict (all stages) or per-stage list of dicts (or None) passed to the mixers; keys must be
            parameters of the mixer's constructor (a misspelt key raises a ``TypeError`` listing the accepted ones).
            A stage's entry may be a list with one dict (or None) per block, for per-block ``token_mixers``.
        mlp_ratios, mlp_act, mlp_bias: channel MLP (ratio 0 = no MLP branch).
        norm_layers: per-stage block norm (names in ``metaformer_zoo.layers.NORM_LAYERS``).
        downsample_norm: norm of the stem (post-conv) and of the downsampling layers (pre-conv).
        layer_scale_init_values, res_scale_init_values: per-stage init (None = no scale).
        output_norm, head_norm_first, head_mlp_ratio, head_dropout: classifier head (see ``MetaFormerHead``).
        img_size: the default input size; mixers tied to a token count (RandFormer) are built for it.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            img_size: Union[int, Tuple[int, int]] = 224,
            depths: Sequence[int] = (2, 2, 6, 2),
            dims: Sequence[int] = (64, 128, 320, 512),
            token_mixers: Union[str, Callable, Sequence[Union[str, Callable]]] = "pooling",
            mixer_kwargs: Union[None, Dict[str, Any], Sequence[Optional[Dict[str, Any]]]] = None,
            mlp_ratios: Union[float, Sequence[float]] = 4,
            mlp_act: Union[str, Callable] = "starrelu",
            mlp_bias: bool = False,
            norm_layers: Union[str, Callable, Sequence[Union[str, Callable]]] = "layernorm2d_nobias",
            downsample_norm: Union[str, Callable, None] = "layernorm2d_nobias",
            layer_scale_init_values: Union[None, float, Sequence[Optional[float]]] = None,
            res_scale_init_values: Union[None, float, Sequence[Optional[float]]] = (None, None, 1.0, 1.0),
            drop_path_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_rate: float = 0.,
            output_norm: Union[str, Callable, None] = "layernorm2d",
            head_norm_first: bool = False,
            head_mlp_ratio: Optional[float] = None,
            head_dropout: float = 0.,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(dims) != num_stages:
            raise ValueError(f"depths has {num_stages} stages but dims has {len(dims)}")
        token_mixers = to_stage_list(token_mixers, num_stages, "token_mixers")
        shared = ", one mixer_kwargs dict for every stage" if isinstance(mixer_kwargs, dict) else ""
        mixer_kwargs = to_stage_list(mixer_kwargs, num_stages, "mixer_kwargs")
        for i, kw in enumerate(mixer_kwargs):
            per_block = isinstance(kw, (list, tuple))
            if per_block and len(kw) != depths[i]:
                raise ValueError(f"mixer_kwargs[{i}] lists {len(kw)} per-block dicts but stage {i} has {depths[i]} "
                                 f"blocks; give one dict (or None) per block, or one dict for the stage")
            for b in (kw if per_block else [kw]):
                if b is not None and not isinstance(b, dict):
                    raise TypeError(f"mixer_kwargs[{i}] must be a dict of keyword arguments for stage {i}'s token "
                                    f"mixer (or None, or one such per block), got {type(b).__name__}: {b!r}")
            block_mixers = token_mixers[i] if isinstance(token_mixers[i], (list, tuple)) else [token_mixers[i]]
            if isinstance(token_mixers[i], (list, tuple)) and len(block_mixers) != depths[i]:
                raise ValueError(f"token_mixers[{i}] lists {len(block_mixers)} per-block mixers but stage {i} has "
                                 f"{depths[i]} blocks; give one name per block or a single name for the stage")
            if per_block:
                names = block_mixers if len(block_mixers) == depths[i] else block_mixers * depths[i]
                for j, (m, b) in enumerate(zip(names, kw)):
                    check_mixer_kwargs(m, b or {}, where=f"stage {i} block {j}")
            else:
                for m in dict.fromkeys(block_mixers):
                    check_mixer_kwargs(m, kw or {}, where=f"stage {i}{shared}")
        mlp_ratios = to_stage_list(mlp_ratios, num_stages, "mlp_ratios")
        norm_layers = to_stage_list(norm_layers, num_stages, "norm_layers")
        ls_values = to_stage_list(layer_scale_init_values, num_stages, "layer_scale_init_values")
        rs_values = to_stage_list(res_scale_init_values, num_stages, "res_scale_init_values")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size

        self.stem = Stem(in_chans, dims[0], norm_layer=get_norm(downsample_norm))
        feat = tuple(conv_out(s, 7, 4, 2) for s in img_size)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages = []
        for i in range(num_stages):
            downsample = None
            if i > 0:
                downsample = Downsampling(dims[i - 1], dims[i], kernel_size=3, stride=2, padding=1,
                                          norm_layer=get_norm(downsample_norm))
                feat = tuple(conv_out(s, 3, 2, 1) for s in feat)
            blocks = []
            for j in range(depths[i]):
                context = dict(feat_size=feat, stage_idx=i, block_idx=j, proj_drop=proj_drop_rate)
                name = token_mixers[i][j] if isinstance(token_mixers[i], (list, tuple)) else token_mixers[i]
                kw = mixer_kwargs[i][j] if isinstance(mixer_kwargs[i], (list, tuple)) else mixer_kwargs[i]
                mixer = create_mixer(name, dims[i], context=context, **dict(kw or {}))
                mlp = make_mlp(dims[i], mlp_ratios[i], mlp_act, mlp_bias, proj_drop_rate) if mlp_ratios[i] else None
                blocks.append(MetaFormerBlock(
                    dims[i], mixer, mlp, norm_layer=norm_layers[i], drop_path=dpr[i][j],
                    layer_scale_init_value=ls_values[i], res_scale_init_value=rs_values[i],
                ))
            stages.append(MetaFormerStage(blocks, downsample))
        self.stages = nn.Sequential(*stages)
        self._init_interface(in_chans, num_classes, dims, reductions=[2 ** (i + 2) for i in range(num_stages)])
        self.min_input_size = 2 ** (num_stages + 1)
        self.head = MetaFormerHead(
            self.num_features, num_classes, global_pool=global_pool, norm_layer=output_norm,
            norm_first=head_norm_first, mlp_ratio=head_mlp_ratio, head_dropout=head_dropout, drop_rate=drop_rate,
        )
        self.apply(self._init_weights)

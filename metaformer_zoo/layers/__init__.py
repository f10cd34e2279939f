"""Layers shared by the zoo families.

Most building blocks come from timm (``timm.layers`` and the MetaFormer pieces in ``timm.models.metaformer``); this
module re-exports them under one roof and adds what timm lacks: name -> layer lookups that accept the strings used
in model kwargs (so ``model_args`` stay JSON-serialisable for ``save_for_hf``) and the zoo's no-weight-decay hook.
"""
from functools import partial
from typing import Callable, Optional, Type, Union

import torch.nn as nn
from timm.layers import DropPath, GroupNorm1, LayerNorm, LayerNorm2d, Mlp, get_act_layer, trunc_normal_
from timm.models.metaformer import (
    Downsampling,
    GroupNorm1NoBias,
    LayerNorm2dNoBias,
    LayerNormNoBias,
    MlpHead,
    Scale,
    SquaredReLU,
    StarReLU,
)

__all__ = [
    "DropPath", "GroupNorm1", "GroupNorm1NoBias", "LayerNorm", "LayerNorm2d", "LayerNorm2dNoBias", "LayerNormNoBias",
    "Mlp", "MlpHead", "Scale", "SquaredReLU", "StarReLU", "Downsampling", "trunc_normal_",
    "get_norm", "get_act", "NORM_LAYERS", "ACT_LAYERS",
]

# 2D (NCHW) norms by name. eps defaults follow the official code of the families that use them.
NORM_LAYERS = {
    "layernorm2d": partial(LayerNorm2d, eps=1e-6),          # channel LN with bias (timm)
    "layernorm2d_nobias": LayerNorm2dNoBias,                 # MetaFormer baselines: channel LN, weight only, eps 1e-6
    "groupnorm1": partial(GroupNorm1, eps=1e-5),            # PoolFormer v1 block norm: GN(1, C) with bias, eps 1e-5
    "groupnorm1_nobias": GroupNorm1NoBias,                   # PoolFormerV2/Id/Rand "modified LN": GN(1) no bias, 1e-6
    "batchnorm2d": nn.BatchNorm2d,
    "layernorm": partial(LayerNorm, eps=1e-6),              # over the last dim (for pooled vectors / NHWC)
}

ACT_LAYERS = {
    "starrelu": StarReLU,
    "squaredrelu": SquaredReLU,
}


def get_norm(norm: Union[str, Type[nn.Module], Callable, None]) -> Optional[Callable]:
    """Resolve a norm layer given by name (see ``NORM_LAYERS``) or pass a class/callable through."""
    if norm is None or norm == "" or norm == "none":
        return None
    if isinstance(norm, str):
        try:
            return NORM_LAYERS[norm.lower()]
        except KeyError:
            raise ValueError(f"unknown norm layer {norm!r}; choose one of {sorted(NORM_LAYERS)}") from None
    return norm


def get_act(act: Union[str, Type[nn.Module], Callable, None]) -> Optional[Callable]:
    """Resolve an activation by name: the zoo's own (``starrelu``, ``squaredrelu``) first, then timm's names."""
    if act is None or act == "":
        return None
    if isinstance(act, str):
        if act.lower() in ACT_LAYERS:
            return ACT_LAYERS[act.lower()]
        layer = get_act_layer(act)
        if layer is None:
            raise ValueError(f"unknown activation {act!r}")
        return layer
    return act

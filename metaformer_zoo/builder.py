"""``build_zoo_model``: timm's ``build_model_with_cfg`` plus what every zoo family needs around it.

* ``device=`` / ``dtype=`` factory kwargs (``timm.create_model(name, device="meta")``) for any model class, by building
  under a ``torch.device`` context instead of threading the kwargs through every layer;
* the default feature config (``flatten_sequential``, out_indices of the 4 stages);
* the family's ``checkpoint_filter_fn`` for official checkpoints;
* a failed weight download raises ``metaformer_zoo.hub.WeightsUnavailableError`` naming the URL / Hub id.
"""
from typing import Callable, Optional

import torch
from timm.models import build_model_with_cfg

__all__ = ["build_zoo_model"]


def build_zoo_model(
        model_cls: Callable,
        variant: str,
        pretrained: bool = False,
        pretrained_filter_fn: Optional[Callable] = None,
        num_stages: int = 4,
        feature_cfg: Optional[dict] = None,
        **kwargs,
):
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    out_indices = kwargs.pop("out_indices", tuple(range(num_stages)))
    feature_cfg = dict(flatten_sequential=True, out_indices=out_indices, **(feature_cfg or {}))

    def _factory(**model_kwargs):
        if device is None:
            return model_cls(**model_kwargs)
        with torch.device(device):
            return model_cls(**model_kwargs)

    try:
        model = build_model_with_cfg(
            _factory, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, feature_cfg=feature_cfg, **kwargs)
    except Exception as e:
        if not pretrained:
            raise
        from .hub import weights_unavailable_error  # name the URL / Hub id when the download fails
        err = weights_unavailable_error(variant, e, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if err is None:
            raise
        raise err from e
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model

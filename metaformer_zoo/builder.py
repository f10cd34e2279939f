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

    if pretrained:
        _require_weight_source(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
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


def _require_weight_source(variant, pretrained_cfg=None, overlay=None):
    """``pretrained=True`` on a variant without any known weights is an error, not a silent random init."""
    from timm.models._builder import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if cfg is None:
        return
    if cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict is not None or getattr(cfg, "source", None):
        return
    notes = f" Notes: {cfg.notes}" if getattr(cfg, "notes", None) else ""
    raise ValueError(
        f"no pretrained weights are known for {variant} (tag {cfg.tag!r}): its default cfg has no url, file or Hub id."
        f"{notes} Use pretrained=False, or load weights with pretrained_cfg_overlay=dict(file='weights.pth') or "
        f"checkpoint_path=... (official checkpoints convert with tools/convert.py)."
    )

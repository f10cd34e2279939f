"""``build_zoo_model``: timm's ``build_model_with_cfg`` plus what every zoo family needs around it.

* ``device=`` / ``dtype=`` factory kwargs (``timm.create_model(name, device="meta")``) for any model class, by building
  under a ``torch.device`` context instead of threading the kwargs through every layer;
* the default feature config (``flatten_sequential``, out_indices of the 4 stages);
* the family's ``checkpoint_filter_fn`` for official checkpoints, the same for every loading path:
  ``pretrained=True`` (URL, Hub, ``pretrained_cfg_overlay=dict(file=...)``) passes it to timm as
  ``pretrained_filter_fn``, and a ``load_state_dict`` pre-hook (``checkpoint.official_layout_pre_hook``) applies it
  to official layouts given to ``model.load_state_dict``, which is what ``timm.create_model(name,
  checkpoint_path=...)`` calls;
* the safe reader's allow-list (``checkpoint.SAFE_GLOBALS``: argparse.Namespace, yacs CfgNode) is active while timm
  reads pretrained weights, so official files that pickle a training config load through timm's own weights-only
  reader; a zoo model never needs timm's ``custom_load`` (it is set to False: every file takes that one path);
* a pretrained file (or cached download) that cannot be read (empty, truncated, text, foreign pickles) raises the zoo's
  ``CheckpointError`` naming the file, the problem and the fix; a failed weight download raises
  ``metaformer_zoo.hub.WeightsUnavailableError`` naming the URL / Hub id.
"""
import functools
import os
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import torch
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg

from .checkpoint import CheckpointError, allow_safe_globals, load_checkpoint_file, official_layout_pre_hook

__all__ = ["build_zoo_model", "WeightsUnavailableError", "weights_source", "weights_unavailable_error"]


class WeightsUnavailableError(OSError):
    """Pretrained weights could not be fetched (no network, no cache); the message names the source and the fix."""


def weights_source(model_name: str, pretrained_cfg: Any = None, pretrained_cfg_overlay: Optional[dict] = None) -> str:
    """Human-readable source of ``model_name``'s pretrained weights (file, Hub id and/or URL), '' if it has none."""
    try:
        cfg = resolve_pretrained_cfg(model_name, pretrained_cfg=pretrained_cfg,
                                     pretrained_cfg_overlay=pretrained_cfg_overlay)
    except Exception:  # noqa: BLE001 - unknown tag etc.: timm reports those itself
        return ""
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    parts = []
    if cfg.get("file"):
        parts.append(f"file {cfg['file']}")
    if cfg.get("hf_hub_id"):
        parts.append(f"Hugging Face Hub id {cfg['hf_hub_id']}")
    if cfg.get("url"):
        parts.append(f"URL {cfg['url']}")
    return " / ".join(parts)


def _is_fetch_error(e: BaseException) -> bool:
    if isinstance(e, CheckpointError):
        return False
    if isinstance(e, OSError):  # URLError, ConnectionError, FileNotFoundError, HF LocalEntryNotFoundError, timeouts
        return True
    mod = type(e).__module__ or ""
    return mod.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub")


def weights_unavailable_error(model_name: str, error: BaseException, pretrained_cfg: Any = None,
                              pretrained_cfg_overlay: Optional[dict] = None) -> Optional[WeightsUnavailableError]:
    """A ``WeightsUnavailableError`` for a failed pretrained load caused by ``error``, or None if it is not a fetch error.

    Used by ``metaformer_zoo.builder.build_zoo_model`` so ``timm.create_model(name, pretrained=True)`` without network
    says which URL / Hub id it needed and how to load the weights offline.
    """
    if not _is_fetch_error(error):
        return None
    src = weights_source(model_name, pretrained_cfg, pretrained_cfg_overlay) or "(no source registered)"
    tag = getattr(pretrained_cfg, "tag", None) or (pretrained_cfg if isinstance(pretrained_cfg, str) else None)
    full = f"{model_name}.{tag}" if tag and "." not in model_name else model_name
    return WeightsUnavailableError(
        f"could not load pretrained weights for {full} from {src}: {type(error).__name__}: {error}. "
        f"Without network, download the file elsewhere and pass "
        f"pretrained_cfg_overlay=dict(file='/path/to/weights') (official files are converted on load), convert it once "
        f"with `python tools/convert.py --model {model_name.split('.')[0]} --checkpoint FILE --out DIR` and use "
        f"timm.create_model('local-dir:DIR', pretrained=True), or point TORCH_HOME / HF_HOME at a cache holding it."
    )



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
            model = model_cls(**model_kwargs)
        else:
            with torch.device(device):
                model = model_cls(**model_kwargs)
        if pretrained_filter_fn is not None:
            model.register_load_state_dict_pre_hook(
                functools.partial(official_layout_pre_hook, filter_fn=pretrained_filter_fn))
        return model

    if not pretrained:
        model = build_model_with_cfg(
            _factory, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, feature_cfg=feature_cfg, **kwargs)
    else:
        _require_weight_source(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {}, custom_load=False)
        try:
            with allow_safe_globals():
                model = build_model_with_cfg(_factory, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn,
                                             feature_cfg=feature_cfg, **kwargs)
        except CheckpointError:
            raise
        except Exception as e:
            err = _unreadable_file_error(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"),
                                         kwargs.get("cache_dir"))
            if err is not None:
                raise err from e
            err = weights_unavailable_error(variant, e, kwargs.get("pretrained_cfg"),
                                            kwargs.get("pretrained_cfg_overlay"))
            if err is None:
                raise
            raise err from e
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def _unreadable_file_error(variant, pretrained_cfg=None, overlay=None, cache_dir=None) -> Optional[CheckpointError]:
    """After a failed pretrained load: the safe reader's ``CheckpointError`` if the local file (a ``file`` source, or
    the cached download of a ``url`` source) is itself unreadable (empty, truncated, text, foreign pickles), else None
    (the failure lies elsewhere, e.g. no network)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if cfg is None or cfg.state_dict or getattr(cfg, "source", "") in ("local-dir", "hf-hub"):
        return None
    path = cfg.file
    if not path and cfg.url and not cfg.hf_hub_id:
        cache = str(cache_dir) if cache_dir else os.path.join(torch.hub.get_dir(), "checkpoints")
        path = os.path.join(cache, os.path.basename(urlparse(cfg.url).path))
    if not path or not os.path.isfile(path):
        return None
    try:
        load_checkpoint_file(path)
    except CheckpointError as err:
        return err
    return None


def _require_weight_source(variant, pretrained_cfg=None, overlay=None):
    """``pretrained=True`` on a variant without any known weights is an error, not a silent random init."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if cfg is None:
        return
    if cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict is not None or getattr(cfg, "source", None):
        return
    notes = f" Notes: {cfg.notes}" if getattr(cfg, "notes", None) else ""
    raise ValueError(
        f"no pretrained weights are known for {variant} (tag {cfg.tag!r}): its default cfg has no url, file or Hub id."
        f"{notes} Use pretrained=False, or load weights with pretrained_cfg_overlay=dict(file='weights.pth') or "
        f"checkpoint_path='weights.pth' (official checkpoints are converted by the family's filter on both paths)."
    )

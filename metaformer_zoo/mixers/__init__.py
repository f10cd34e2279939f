"""Token mixer registry.

Every token mixer in the zoo is an ``nn.Module`` built as ``mixer(dim=dim, **kwargs)`` that maps a (B, C, H, W) feature
map to a (B, C, H, W) feature map. Registering a mixer under a name makes it usable in every family built on the
shared skeleton, e.g. ``timm.create_model("zoo_metaformer", token_mixers=["pooling", "sepconv", "aff", "ss2d"])``.

Besides ``dim`` and the user's kwargs, the skeleton offers each mixer some context (``feat_size``: the (H, W) of the
stage at the model's default ``img_size``; ``stage_idx``; ``block_idx``; ``num_heads``); a mixer receives a context
value only if its constructor names that argument.
"""
import importlib
import inspect
import pkgutil
from typing import Any, Callable, Dict, List, Optional, Union

import torch.nn as nn

__all__ = ["register_mixer", "get_mixer", "create_mixer", "list_mixers"]

_MIXERS: Dict[str, Callable[..., nn.Module]] = {}


def register_mixer(name: str, fn: Optional[Callable[..., nn.Module]] = None):
    """Register ``fn`` (a module class or factory taking ``dim`` first) under ``name``. Usable as a decorator."""

    def _register(f):
        key = name.lower()
        if key in _MIXERS and _MIXERS[key] is not f:
            raise ValueError(f"token mixer {name!r} is already registered ({_MIXERS[key]!r})")
        _MIXERS[key] = f
        return f

    return _register(fn) if fn is not None else _register


def list_mixers() -> List[str]:
    return sorted(_MIXERS)


def get_mixer(name: str) -> Callable[..., nn.Module]:
    try:
        return _MIXERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown token mixer {name!r}; registered mixers: {', '.join(list_mixers())}") from None


def _accepted(fn) -> set:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def create_mixer(
        mixer: Union[str, Callable[..., nn.Module]],
        dim: int,
        context: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """Build a token mixer by name (or from a class/factory) for ``dim`` channels.

    ``context`` values are passed only to mixers whose constructor names them; ``kwargs`` are always passed.
    """
    fn = get_mixer(mixer) if isinstance(mixer, str) else mixer
    if context:
        accepted = _accepted(fn)
        for k, v in context.items():
            if k in accepted and k not in kwargs:
                kwargs[k] = v
    return fn(dim=dim, **kwargs)


def _import_all():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

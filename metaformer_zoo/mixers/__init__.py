"""Token mixer registry.

Every token mixer in the zoo is an ``nn.Module`` built as ``mixer(dim=dim, **kwargs)`` that maps a (B, C, H, W) feature
map to a (B, C, H, W) feature map. Registering a mixer under a name makes it usable in every family built on the
shared skeleton, e.g. ``timm.create_model("zoo_metaformer", token_mixers=["pooling", "sepconv", "aff", "ss2d"])``.

Besides ``dim`` and the user's kwargs, the skeleton offers each mixer some context (``feat_size``: the (H, W) of the
stage at the model's default ``img_size``; ``stage_idx``; ``block_idx``; ``proj_drop``); a mixer receives a context
value only if its constructor names that argument. User kwargs must be named parameters of the constructor: an
unknown (e.g. misspelt) key raises a ``TypeError`` listing the accepted ones instead of being swallowed by ``**kwargs``.
"""
import importlib
import inspect
import pkgutil
from typing import Any, Callable, Dict, List, Optional, Union

import torch.nn as nn

__all__ = ["register_mixer", "get_mixer", "create_mixer", "check_mixer_kwargs", "list_mixers"]

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


def _named_params(fn: Callable) -> Optional[List[str]]:
    """Keyword-passable parameter names of a mixer class / factory (``self`` and ``*args`` / ``**kwargs`` excluded);
    ``None`` when the signature cannot be read (a builtin)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    if inspect.isclass(fn) and params and params[0].name == "self":
        params = params[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _mixer_name(mixer: Union[str, Callable]) -> str:
    return repr(mixer) if isinstance(mixer, str) else getattr(mixer, "__qualname__", repr(mixer))


def check_mixer_kwargs(mixer: Union[str, Callable[..., nn.Module]], kwargs: Dict[str, Any], where: str = "") -> None:
    """Raise a ``TypeError`` naming the keys of ``kwargs`` that the mixer's constructor does not name.

    Many mixers (timm's ``Pooling`` / ``SepConv`` among them) end their signature with ``**kwargs`` to swallow the
    arguments timm's MetaFormer passes to every mixer, so a misspelt option would silently keep its default. User
    kwargs must therefore be named parameters of the constructor (or factory); ``dim`` is set by the model.
    ``where`` (e.g. ``"stage 2"``) is added to the message.
    """
    fn = get_mixer(mixer) if isinstance(mixer, str) else mixer
    label = f"token mixer {_mixer_name(mixer)}" + (f" ({where})" if where else "")
    if "dim" in kwargs:
        raise TypeError(f"{label}: 'dim' is set by the model (the stage width); "
                        f"remove it from the mixer kwargs")
    names = _named_params(fn)
    if names is None:
        return
    accepted = [n for n in names if n != "dim"]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise TypeError(
            f"{label} got unknown kwarg(s) {', '.join(map(repr, unknown))}; it accepts: "
            f"{', '.join(accepted) if accepted else 'no kwargs'}. Check the spelling in mixer_kwargs (a custom "
            f"mixer factory must name its parameters instead of taking **kwargs)."
        )


def create_mixer(
        mixer: Union[str, Callable[..., nn.Module]],
        dim: int,
        context: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """Build a token mixer by name (or from a class/factory) for ``dim`` channels.

    ``kwargs`` (the user's mixer kwargs) must be named parameters of the mixer's constructor, else a ``TypeError``
    lists the accepted ones (see ``check_mixer_kwargs``). ``context`` values are offered by the model and passed only
    to mixers whose constructor names them (and where ``kwargs`` does not set them already).
    """
    fn = get_mixer(mixer) if isinstance(mixer, str) else mixer
    check_mixer_kwargs(mixer, kwargs)
    if context:
        accepted = _named_params(fn) or []
        for k, v in context.items():
            if k in accepted and k not in kwargs:
                kwargs[k] = v
    return fn(dim=dim, **kwargs)


def _import_all():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

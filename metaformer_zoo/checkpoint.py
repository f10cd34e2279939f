"""Checkpoint reading, unwrapping and strict validation with errors that say what is wrong and what to do.

Every loading path of the zoo reads official files the same safe way: ``torch.load(weights_only=True)`` with
``SAFE_GLOBALS`` allow-listed (the harmless objects official release files pickle next to their tensors):

* ``argparse.Namespace``: timm ``CheckpointSaver`` files (TransXNet) pickle the training arguments;
* ``yacs.config.CfgNode``: Swin-style ``save_checkpoint`` files (MS-MLP, Strip-MLP) pickle the training config. It is
  allow-listed *by name* with ``collections.OrderedDict`` as its stand-in (``(OrderedDict, "yacs.config.CfgNode")``):
  the weights-only unpickler then builds a plain ``OrderedDict`` where the pickle says ``CfgNode`` (yacs' own class
  could not be allow-listed: the unpickler only fills exact dict / OrderedDict / Counter objects), so yacs need not be
  installed and no yacs (or other foreign) code runs. ``weights_only=False`` is never used.

Where the zoo reads the file itself (``load_checkpoint_file``: ``tools/convert.py``, ``hub.convert_checkpoint``, the
dense adapters' ``init_cfg``) the allow-list is active for that read only. Where timm reads it
(``timm.create_model(name, pretrained=True)`` from a URL or a ``pretrained_cfg_overlay=dict(file=...)``),
``metaformer_zoo.builder.build_zoo_model`` activates it around the build. ``timm.create_model(name,
checkpoint_path=...)`` reads the file after the zoo's builder has returned, so for that path the CfgNode stand-in alone
is registered process-wide when this module is imported (``torch.serialization.add_safe_globals``): it is bound to the
one name ``yacs.config.CfgNode`` and can only build a plain ``OrderedDict`` (which weights-only loading builds anyway),
so it widens no other load; ``argparse.Namespace`` is allow-listed by timm's own reader.

Family ``checkpoint_filter_fn``s remap official key layouts and then call ``validate_state_dict``, so a wrong,
truncated or mismatched checkpoint never loads partially. ``official_layout_pre_hook`` (registered on every zoo model
by the builder) runs that filter when ``model.load_state_dict`` receives an official layout, so
``checkpoint_path=OFFICIAL_FILE`` converts like ``pretrained=True``.
"""
import argparse
import collections
import os
import pickle
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "SAFE_GLOBALS", "allow_safe_globals", "load_checkpoint_file", "unwrap_state_dict",
           "validate_state_dict", "misfit_error", "check_classifier", "run_family_filter", "official_layout_pre_hook",
           "remap_keys", "linear_to_conv1x1"]

# the (stand-in, "module.Name") form of safe_globals needs torch >= 2.5
_CFGNODE = (collections.OrderedDict, "yacs.config.CfgNode")
SAFE_GLOBALS: List[Any] = [argparse.Namespace, _CFGNODE]
# for timm's own read behind checkpoint_path= (see the module docstring): the name-bound CfgNode stand-in only
torch.serialization.add_safe_globals([_CFGNODE])


def allow_safe_globals():
    """Context manager: ``SAFE_GLOBALS`` allow-listed for ``torch.load(weights_only=True)`` inside it.

    Only the entries not registered already are added (and removed on exit): torch's ``safe_globals`` context removes
    what it was given on exit, which would otherwise drop the process-wide CfgNode registration above.
    """
    registered = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in registered])


# what timm's load_state_dict picks, in this order (use_ema=True, its default for pretrained files and checkpoint_path)
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, as timm's clean_state_dict strips them


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys) or cannot be read."""


def _to_config_dicts(obj: Any) -> Any:
    """Turn plain dicts and config nodes (the CfgNode stand-in: an OrderedDict carrying yacs' ``__immutable__`` flag)
    into plain dicts, recursively; state dicts (OrderedDict without the flag) and tensors stay as they are."""
    if isinstance(obj, dict) and (type(obj) is dict or "__immutable__" in getattr(obj, "__dict__", {})):
        return {k: _to_config_dicts(v) for k, v in obj.items()}
    return obj


def _unsafe_globals(path: str) -> List[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only used to word the error
        return []


def _foreign_globals(path: str, error: BaseException) -> List[str]:
    """The pickled globals the weights-only reader refused (empty when the failure is not about objects)."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if not m and "global" not in str(error).lower():
        return []
    names = [n for n in _unsafe_globals(path) if n not in ("argparse.Namespace", "yacs.config.CfgNode")]
    return names or ([m.group(1)] if m else [])


def _read_error(path: str, error: BaseException) -> CheckpointError:
    """A ``CheckpointError`` naming the file, what is wrong with it and what to do."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    detail = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else '(no message)'}"
    if size == 0:
        what = "the file is empty (0 bytes): an interrupted download or copy? Download it again."
    elif _is_text(head):
        what = (f"it is a text file, not a PyTorch checkpoint (it starts with {head[:40]!r}): an HTML error page or "
                f"a Git LFS pointer instead of the weights? Download the real file.")
    elif isinstance(error, pickle.UnpicklingError) and _foreign_globals(path, error):
        listed = ", ".join(_foreign_globals(path, error))
        what = (f"it pickles objects other than tensors and plain data ({listed}). Checkpoints are read with "
                f"torch.load(weights_only=True), allowing only argparse.Namespace and yacs CfgNode beside tensors; "
                f"arbitrary objects are never unpickled. Save the weights alone (a state dict of tensors, or "
                f".safetensors) and load that file.")
    else:
        what = f"the file is truncated or corrupt, or not a PyTorch / safetensors checkpoint ({detail}). Download " \
               f"it again (compare its size / sha256 with the release)."
    return CheckpointError(f"cannot read checkpoint {path} ({size} bytes): {what} Nothing was loaded.")


def _is_text(head: bytes) -> bool:
    return bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def load_checkpoint_file(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Read a ``.safetensors`` / ``.pth`` / ``.pth.tar`` / ``.bin`` file without executing arbitrary pickles.

    ``torch.load(weights_only=True)`` with ``SAFE_GLOBALS`` allow-listed (see the module docstring); config nodes come
    back as plain dicts (e.g. ``ckpt["config"]["MODEL"]["TYPE"]``). Missing, empty, truncated, corrupt or text files
    and files pickling other objects raise ``CheckpointError`` naming the file, the problem and the fix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}. Check the path. Nothing was loaded.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device=map_location)
        with allow_safe_globals():
            return _to_config_dicts(torch.load(path, map_location=map_location, weights_only=True))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _read_error(path, e) from e


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint, picked as timm's ``load_state_dict`` picks it.

    ``state_dict_ema``, ``model_ema``, ``state_dict``, ``model`` (first present; EMA weights first, as timm does for
    ``pretrained=True`` files and ``checkpoint_path=``), then ``module.`` / ``_orig_mod.`` prefixes are stripped, so
    every loading path gets the same weights from the same file.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith(_PREFIXES):
            k = k[len("module."):] if k.startswith("module.") else k[len("_orig_mod."):]
        out[k] = v
    if not out:
        raise CheckpointError("the checkpoint holds no tensors")
    return out


def remap_keys(state_dict: Mapping[str, torch.Tensor], rules: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Apply regex substitutions ``(pattern, replacement)`` in order to every key."""
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def is_official_layout(state_dict: Mapping[str, torch.Tensor], family: str, zoo_key: str,
                       official_keys: Sequence[str] = (), origin: str = "official",
                       hint: str = "Is this a checkpoint of another family?") -> bool:
    """Which layout a (unwrapped) state dict is in: ``False`` for the zoo's (it holds ``zoo_key``), ``True`` for the
    official one (it holds ``official_keys[0]``; the other keys only illustrate the layout in the message).

    Anything else raises ``CheckpointError`` naming both layouts, a sample of the file's keys and ``hint``.
    """
    if zoo_key in state_dict:
        return False
    if official_keys and official_keys[0] in state_dict:
        return True
    sample = ", ".join(sorted(state_dict)[:5])
    expected = f"{origin} keys ({', '.join(repr(k) for k in official_keys)}, ...) or zoo keys" if official_keys \
        else "metaformer_zoo keys"
    raise CheckpointError(f"unrecognised checkpoint layout for {family}: expected {expected} ({zoo_key!r}), "
                          f"got {sample} ... {hint}")


def linear_to_conv1x1(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Reshape official ``nn.Linear`` weights (out, in) to the model's 1x1 conv weights (out, in, 1, 1) where needed."""
    target = model.state_dict()
    for k, v in state_dict.items():
        t = target.get(k)
        if t is not None and v.dim() == 2 and t.dim() == 4 and t.shape[2:] == (1, 1) and v.numel() == t.numel():
            state_dict[k] = v.reshape(t.shape)
    return state_dict


def _fmt(keys: Sequence[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def misfit_error(header: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str],
                 advice: str, limits: Tuple[int, int, int] = (8, 8, 4)) -> CheckpointError:
    """The ``CheckpointError`` of a state dict that does not fit a model: ``header``, then one line per non-empty
    list (missing keys, unexpected keys, mis-shaped tensors; each with its count and at most ``limits[i]`` entries,
    in the order given), then ``advice``."""
    parts = [header]
    for keys, what, limit in zip((missing, unexpected, mismatched),
                                 ("missing key(s)", "unexpected key(s)", "mis-shaped tensor(s)"), limits):
        if keys:
            parts.append(f"{len(keys)} {what}: {_fmt(keys, limit)}")
    parts.append(advice)
    return CheckpointError("\n  ".join(parts))


def validate_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        source: str = "checkpoint",
        allow_missing: Optional[Callable[[str], bool]] = None,
) -> Mapping[str, torch.Tensor]:
    """Raise ``CheckpointError`` unless ``state_dict`` fits ``model`` exactly (names and shapes).

    Classifier keys are exempt when the checkpoint's head does not match ``model.num_classes``: timm drops the
    classifier itself in that case (``num_classes`` differs from the pretrained cfg) and re-initialises it.
    """
    target = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    # a checkpoint head that does not fit a re-sized classifier is dropped by timm's load_pretrained afterwards
    head_keys = {f"{c}.{p}" for c in classifier for p in ("weight", "bias")}

    def _head_refit(k):
        return k in head_keys and (k not in target or tuple(target[k].shape) != tuple(state_dict[k].shape))

    missing = sorted(k for k in target if k not in state_dict and not (allow_missing and allow_missing(k)))
    unexpected = sorted(k for k in state_dict if k not in target and not _head_refit(k))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state_dict
        if k in target and tuple(state_dict[k].shape) != tuple(target[k].shape) and not _head_refit(k)
    )
    if missing or unexpected or mismatched:
        name = getattr(model, "pretrained_cfg", {}).get("architecture") if hasattr(model, "pretrained_cfg") else None
        name = name or type(model).__name__
        raise misfit_error(
            f"{source} does not fit {name}:", missing, unexpected, mismatched,
            "Check that the checkpoint is for this variant (depths/dims) and family, and that the model was created "
            "with the same num_classes / img_size as the checkpoint. Nothing was loaded.")
    return state_dict


def check_classifier(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` when the checkpoint classifier has another number of classes than ``model``.

    For strict loads (``checkpoint_path=``, ``tools/convert.py``); ``pretrained=True`` re-initialises a re-sized head
    itself (timm's ``load_pretrained``) and does not need this.
    """
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    target = model.state_dict()
    for k in (f"{c}.{p}" for c in classifier for p in ("weight", "bias")):
        if k in state_dict and k in target and tuple(state_dict[k].shape) != tuple(target[k].shape):
            n = state_dict[k].shape[0]
            raise CheckpointError(
                f"{source}: the checkpoint classifier {k} has shape {tuple(state_dict[k].shape)}, the model "
                f"{tuple(target[k].shape)}: create the model with num_classes={n} (tools/convert.py --num-classes "
                f"{n}), or load it with pretrained=True and pretrained_cfg_overlay=dict(file=...), which "
                f"re-initialises a re-sized classifier. Nothing was loaded.")


# what a family filter raises when it is handed a file it cannot read as an official layout (reworded as a misfit)
_FILTER_FAILURES = (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError)


def run_family_filter(filter_fn: Callable, state_dict: Any, model: nn.Module, where: str, failed: str,
                      filter_name: str, hint: str) -> Any:
    """``filter_fn(state_dict, model)`` (a family's ``checkpoint_filter_fn``), every error as a ``CheckpointError``.

    The filter's own ``CheckpointError`` (a misfit it diagnosed) comes back prefixed with ``where``; any other error
    of ``_FILTER_FAILURES`` (the filter choked on a layout it was not written for) becomes ``"{failed}: the
    {filter_name} checkpoint filter failed with <error>. {hint} Nothing was loaded."``.
    """
    try:
        return filter_fn(state_dict, model)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except _FILTER_FAILURES as e:
        raise CheckpointError(f"{failed}: the {filter_name} checkpoint filter failed with {type(e).__name__}: {e}. "
                              f"{hint} Nothing was loaded.") from e


def official_layout_pre_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: dict,
                             strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list,
                             filter_fn: Optional[Callable] = None) -> None:
    """``load_state_dict`` pre-hook: an official checkpoint layout is converted by the family's filter, strictly.

    Registered by ``metaformer_zoo.builder.build_zoo_model`` on every zoo model (bound to the same
    ``checkpoint_filter_fn`` that ``pretrained=True`` uses, with ``functools.partial`` so models stay picklable), it
    makes ``timm.create_model(name, checkpoint_path=OFFICIAL_FILE)`` and ``model.load_state_dict(official_sd)`` work.
    It acts only when the model is the root of the load (``prefix == ''``) and the incoming dict is not in the zoo
    layout: it holds keys the model does not have and lacks the model's stem weight (``pretrained_cfg['first_conv']``,
    the anchor every family filter also uses to tell the layouts apart). Zoo-layout dicts, partial ones included,
    load as torch loads them. The converted dict replaces the incoming one before anything is copied, so a misfit
    (``CheckpointError`` from the filter: missing / unexpected / mis-shaped keys, another family, another classifier
    size) loads nothing.
    """
    if prefix or filter_fn is None or not state_dict:
        return
    own = module.state_dict(keep_vars=True)
    if all(k in own for k in state_dict):
        return
    first_conv = (getattr(module, "pretrained_cfg", None) or {}).get("first_conv")
    anchors = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv or ())
    if any(f"{a}.weight" in state_dict for a in anchors) or (not anchors and any(k in own for k in state_dict)):
        return
    source = "state dict (official layout)"
    converted = dict(run_family_filter(
        filter_fn, dict(state_dict), module, where=source, failed=f"{source} -> {type(module).__name__}",
        filter_name="family's", hint="It is probably not an official checkpoint of this family and variant."))
    check_classifier(converted, module, source)
    state_dict.clear()
    state_dict.update(converted)

"""Checkpoint reading, unwrapping and strict validation with errors that say what is wrong and what to do.

Family ``checkpoint_filter_fn``s remap official key layouts and then call ``validate_state_dict``, so a wrong,
truncated or mismatched checkpoint never loads partially.
"""
import os
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "load_checkpoint_file", "unwrap_state_dict", "validate_state_dict", "remap_keys",
           "linear_to_conv1x1"]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (missing, unexpected or mis-shaped keys) or cannot be read."""


def load_checkpoint_file(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Read a ``.safetensors`` / ``.pth`` / ``.pth.tar`` / ``.bin`` file without executing arbitrary pickles.

    Uses ``torch.load(weights_only=True)``; files carrying foreign objects (e.g. a yacs config) are handled by the
    family that needs them. Truncated or corrupt files raise ``CheckpointError`` naming the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device=map_location)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        size = os.path.getsize(path)
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): {type(e).__name__}: {e}. The file may be truncated or "
            f"corrupt (download it again), or hold pickled objects other than tensors (convert it with "
            f"tools/convert.py, which knows each family's official format)."
        ) from e


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Return the tensor dict inside common training-checkpoint wrappers (``state_dict``, ``model``, ``module.``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in ("state_dict", "model", "model_ema", "state_dict_ema"):
        if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj[key], torch.Tensor):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
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


def linear_to_conv1x1(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Reshape official ``nn.Linear`` weights (out, in) to the model's 1x1 conv weights (out, in, 1, 1) where needed."""
    target = model.state_dict()
    for k, v in state_dict.items():
        t = target.get(k)
        if t is not None and v.dim() == 2 and t.dim() == 4 and t.shape[2:] == (1, 1) and v.numel() == t.numel():
            state_dict[k] = v.reshape(t.shape)
    return state_dict


def _fmt(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


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

    missing = [k for k in target if k not in state_dict and not (allow_missing and allow_missing(k))]
    unexpected = [k for k in state_dict if k not in target and not _head_refit(k)]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state_dict
        if k in target and tuple(state_dict[k].shape) != tuple(target[k].shape) and not _head_refit(k)
    ]
    if missing or unexpected or mismatched:
        name = getattr(model, "pretrained_cfg", {}).get("architecture") if hasattr(model, "pretrained_cfg") else None
        name = name or type(model).__name__
        parts = [f"{source} does not fit {name}:"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} mis-shaped tensor(s): {_fmt(mismatched, 4)}")
        parts.append("Check that the checkpoint is for this variant (depths/dims) and family, and that the model was "
                     "created with the same num_classes / img_size as the checkpoint. Nothing was loaded.")
        raise CheckpointError("\n  ".join(parts))
    return state_dict

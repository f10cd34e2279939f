"""Helpers shared by the test modules (import as ``from helpers import perturb``; tests/ is on sys.path)."""
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from metaformer_zoo.checkpoint import CheckpointError
from metaformer_zoo.skeleton import MetaFormerBase
from metaformer_zoo.zoo import count_macs, count_params

__all__ = ["perturb", "load_script", "check_params_and_macs", "ceil_sizes", "check_forward_sizes",
           "intermediate_sizes", "features_only_sizes", "check_skeleton_hooks", "check_input_errors",
           "check_official_roundtrip", "check_filter_rejects", "check_resized_load"]

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Move every floating-point tensor of the state dict (parameters and buffers) away from its init, so a wrong key
    mapping, a dropped tensor or a mis-shaped reshape shows in the outputs; returns the model in eval mode.

    Norm weights and layer / res scales are init to constants (ones, 1e-5 ...) that hide a swapped mapping: every
    tensor gets ``scale * N(0, 1)`` added; BatchNorm running variances get ``U(0.5, 1.5)`` (they must stay positive).
    Deterministic for a given ``seed`` and state-dict order.
    """
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        if name.endswith("running_var"):
            t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
        else:
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model.eval()


def load_script(relpath: str, module_name: str):
    """Import a script of the repository that is not a package module (``tools/convert.py`` ...) from its file, as a
    module named ``module_name`` (not added to ``sys.modules``), and return it."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_params_and_macs(name: str, params: int, macs: float, rel: float = 0.01) -> None:
    """``name`` built on the meta device has exactly ``params`` parameters and ``macs`` MACs at 224 px to ``rel``."""
    model = timm.create_model(name, device="meta")
    assert count_params(model)[0] == params
    assert abs(count_macs(model, (3, 224, 224), device="meta") - macs) / macs < rel


def ceil_sizes(size, reductions=(4, 8, 16, 32)) -> list:
    """The spatial size ``(ceil(H / r), ceil(W / r))`` of a feature map at each reduction ``r`` of an ``H x W``
    input."""
    return [(-(-size[0] // r), -(-size[1] // r)) for r in reductions]


@torch.no_grad()
def check_forward_sizes(model: nn.Module, size, num_classes: int = 1000, channels=None) -> None:
    """On a random ``(1, 3, *size)`` input: the classifier output is ``(1, num_classes)`` and finite, and each map of
    ``forward_intermediates`` has the spatial size of :func:`ceil_sizes` (with ``channels``: the whole shape
    ``(1, c, h, w)``, else only the last two dims)."""
    x = torch.randn(1, 3, *size)
    out = model(x)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (1, num_classes) and torch.isfinite(out).all()
    if channels is None:
        for f, hw in zip(feats, ceil_sizes(size)):
            assert f.shape[-2:] == hw
    else:
        for f, c, hw in zip(feats, channels, ceil_sizes(size)):
            assert f.shape == (1, c, *hw)


@torch.no_grad()
def intermediate_sizes(model: nn.Module, size) -> list:
    """The spatial sizes of the ``forward_intermediates`` maps of ``model`` on a random ``(1, 3, *size)`` input."""
    feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    return [tuple(f.shape[-2:]) for f in feats]


@torch.no_grad()
def features_only_sizes(name: str, size) -> list:
    """The spatial sizes of the maps of ``timm.create_model(name, features_only=True)`` on a random input."""
    model = timm.create_model(name, features_only=True).eval()
    return [tuple(f.shape[-2:]) for f in model(torch.randn(1, 3, *size))]


@torch.no_grad()
def check_skeleton_hooks(model: nn.Module, x: torch.Tensor):
    """``model`` keeps the skeleton's ``forward_intermediates`` / ``group_matcher`` (no override), its parameter groups
    cover every parameter, and the final output of ``forward_intermediates(x)`` is ``forward_features(x)``; returns
    ``(final, intermediates)``."""
    assert type(model).forward_intermediates is MetaFormerBase.forward_intermediates
    assert type(model).group_matcher is MetaFormerBase.group_matcher
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    final, feats = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    return final, feats


def check_input_errors(model: nn.Module) -> None:
    """``model`` refuses, by a clear ValueError, a 16 x 64 input ("too small") and a 1-channel one ("input
    channels")."""
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 64, 64))


# Official-checkpoint conversion of a family module ``family`` (``official_state_dict(model)`` -> the official layout,
# ``checkpoint_filter_fn(checkpoint, model)`` -> this model's state dict).

def check_official_roundtrip(family, model: nn.Module, fresh: nn.Module, official: dict, checkpoint=None) -> None:
    """``official`` (``family.official_state_dict(model)``) loads strictly into the ``fresh`` build through
    ``family.checkpoint_filter_fn`` (``checkpoint``, the file's dict around it, when given), which then gives
    ``model``'s outputs exactly, and converts back to the same official tensors."""
    fresh.load_state_dict(family.checkpoint_filter_fn(official if checkpoint is None else checkpoint, fresh),
                          strict=True)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    back = family.official_state_dict(fresh)
    assert all(torch.equal(back[k], official[k]) for k in official)


def check_filter_rejects(family, model: nn.Module, official: dict, foreign: dict, drop: str) -> None:
    """``family.checkpoint_filter_fn`` refuses ``foreign`` (unknown keys: "unrecognised checkpoint layout") and the
    official state dict less the key ``drop`` ("missing")."""
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        family.checkpoint_filter_fn(foreign, model)
    bad = dict(official)
    del bad[drop]
    with pytest.raises(CheckpointError, match="missing"):
        family.checkpoint_filter_fn(bad, model)


def check_resized_load(family, name: str, img_size: int, new_size: int, **kwargs) -> nn.Module:
    """A perturbed ``name`` built for ``img_size``, in the official layout, loads through
    ``family.checkpoint_filter_fn`` into a build for ``new_size`` that gives the first model's outputs on a
    ``new_size`` input (to 1e-5); returns that second build."""
    a = perturb(timm.create_model(name, img_size=img_size, **kwargs))
    b = timm.create_model(name, img_size=new_size, **kwargs).eval()
    b.load_state_dict(family.checkpoint_filter_fn(family.official_state_dict(a), b))
    x = torch.randn(1, 3, new_size, new_size)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    return b

"""Framework-free core of the dense-prediction backbone adapter (plain PyTorch + timm; no mmengine/mmdet/mmseg).

``DenseBackboneMixin`` turns any zoo / timm model with the zoo feature interface (``forward_intermediates``,
``prune_intermediate_layers``, ``feature_info``) into a detection / segmentation backbone: a tuple of NCHW maps for
``out_indices`` with an optional norm per output, ``frozen_stages``, ``norm_eval``, input padding per the family's
size rules, and strict checkpoint loading from zoo, timm or official checkpoints. The mmengine-registered
``MetaFormerZooBackbone`` (``metaformer_zoo.dense``) and the plain ``DenseBackbone`` both use it.

Per-output norms (``out_norms``):

* ``'official'`` (default): what the family's official dense code puts on each output, declared as data in its spec
  (``FamilySpec.dense_out_norms``: one norm spec per stage, None = no norm; e.g. PoolFormer v1's ``fork_feat``
  backbone: ``'groupnorm1'`` on each output). A family that declares nothing gets the default.
* ``True``: a norm on every output: the family's norm where it declares one, else ``DEFAULT_OUT_NORM``.
* ``False``: no norm (raw stage outputs).
* a norm name (``metaformer_zoo.layers.NORM_LAYERS``, e.g. ``'layernorm2d'``, ``'groupnorm1'``) or a per-output list
  of names / None.

``DEFAULT_OUT_NORM`` = ``'layernorm2d'`` (channel LayerNorm with bias, eps 1e-6), the Swin / ConvNeXt convention for
hierarchical backbones without an official dense version. ``out_norm_skip`` lists output indices whose norm is
Identity: the official PoolFormer / TransXNet RetinaNet mode (``FORK_LAST3`` / ``start_level=1``) skips output 0,
which FPN with ``start_level=1`` does not use.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import group_parameters
from timm.models._hub import download_cached_file

from ..checkpoint import CheckpointError, allow_safe_globals, load_checkpoint_file, misfit_error, unwrap_state_dict
from ..layers import get_norm
from ..zoo import family_of

__all__ = [
    "DEFAULT_OUT_NORM", "DenseBackboneMixin", "DenseBackbone", "resolve_out_norms",
    "family_out_norm", "make_norm", "strip_prefixes", "prepare_trunk_state_dict", "layer_id_map",
]

DEFAULT_OUT_NORM = "layernorm2d"

_NO_NORM = ("identity", "none", "")


def _family(model_name: str):
    try:
        return family_of(model_name)
    except ValueError:
        return None


def make_norm(spec: Any, dim: int) -> Optional[nn.Module]:
    """A norm module from a spec: None/False/'identity' -> None, a name, a dict(type=...), a class, a module."""
    if spec is None or spec is False or (isinstance(spec, str) and spec.lower() in _NO_NORM):
        return None
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        typ = str(spec.pop("type")).lower()
        spec.pop("official_keys", None)
        spec.pop("start_level", None)
        if typ == "groupnorm":
            return nn.GroupNorm(spec.pop("num_groups", 1), dim, **spec)
        if typ in ("layernorm2d", "ln2d", "layernorm"):
            return LayerNorm2d(dim, **spec)
        return get_norm(typ)(dim, **spec)
    return get_norm(spec)(dim)


def family_out_norm(model_name: str, stage_idx: int, dim: int) -> Tuple[bool, Optional[nn.Module]]:
    """(declared, norm) for output ``stage_idx`` of ``model_name`` from its family spec's ``dense_out_norms``:
    ``declared`` is False when the family says nothing (then the caller applies ``DEFAULT_OUT_NORM``); ``norm`` None
    means the official code has no norm there."""
    fam = _family(model_name)
    table = fam.dense_out_norms if fam is not None else None
    if table is None:
        return False, None
    value = table[stage_idx] if stage_idx < len(table) else None
    return True, make_norm(value, dim)


def resolve_out_norms(
        model_name: str,
        out_indices: Sequence[int],
        dims: Sequence[int],
        out_norms: Union[bool, str, Sequence[Any]] = "official",
        out_norm_skip: Sequence[int] = (),
) -> List[Optional[nn.Module]]:
    """One norm module (or None) per entry of ``out_indices``; see the module docstring for the modes."""
    if len(dims) != len(out_indices):
        raise ValueError(f"got {len(dims)} dims for {len(out_indices)} out_indices")
    norms: List[Optional[nn.Module]] = []
    if isinstance(out_norms, (list, tuple)):
        if len(out_norms) != len(out_indices):
            raise ValueError(f"out_norms lists {len(out_norms)} norms but out_indices has {len(out_indices)} entries")
        norms = [make_norm(s, d) for s, d in zip(out_norms, dims)]
    elif out_norms is False or out_norms is None:
        norms = [None] * len(out_indices)
    elif out_norms is True or out_norms == "official":
        for idx, d in zip(out_indices, dims):
            declared, norm = family_out_norm(model_name, idx, d)
            if not declared or (norm is None and out_norms is True):
                norm = make_norm(DEFAULT_OUT_NORM, d)
            norms.append(norm)
    elif isinstance(out_norms, str):
        norms = [make_norm(out_norms, d) for d in dims]
    else:
        raise ValueError(f"out_norms must be True, False, 'official', a norm name or a per-output list; "
                         f"got {out_norms!r}")
    return [None if idx in tuple(out_norm_skip) else n for idx, n in zip(out_indices, norms)]


# --- checkpoints -------------------------------------------------------------------------------------------------
def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Keep the backbone part of a checkpoint and strip wrapper prefixes.

    ``prefix`` given: keep only keys under it (stripped), error if none. Otherwise a detector / segmentor checkpoint
    (keys ``backbone.*`` beside ``neck.*`` / ``decode_head.*``) is reduced to its ``backbone.`` keys, and the adapter's
    own ``model.`` wrapper prefix is removed (``out_norms.*`` keys stay).
    """
    sd = dict(state_dict)
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"no key of the checkpoint starts with prefix {prefix!r}")
    elif any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    body = [k for k in sd if not k.startswith("out_norms.")]
    if body and all(k.startswith("model.") for k in body):
        sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()}
    return sd


_OFFICIAL_OUT_NORM = re.compile(r"^norm([0246])\.(weight|bias)$")


def _family_filter(model_name: str):
    fam = _family(model_name)
    return fam.official.filter if fam is not None and fam.official is not None else None


def prepare_trunk_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model_name: str,
        trunk: nn.Module,
        reference: Optional[nn.Module] = None,
        num_out_norms: int = 0,
        source: str = "checkpoint",
        prefix: Optional[str] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Turn a zoo / timm / official (classification or dense) checkpoint into (trunk_sd, out_norm_sd).

    The family's ``checkpoint_filter_fn`` converts official layouts (validated against ``reference``, the full
    classification model); head / final-norm / pruned-stage keys are dropped; the rest must match ``trunk`` exactly,
    else ``CheckpointError`` lists missing / unexpected / mis-shaped keys. Official ``fork_feat`` out-norm keys
    (``norm0/2/4/6``) and the adapter's ``out_norms.*`` keys are returned separately.
    """
    sd = strip_prefixes(unwrap_state_dict(dict(state_dict)), prefix)
    target = trunk.state_dict()
    norm_sd = {k: sd.pop(k) for k in list(sd) if k.startswith("out_norms.")}
    if num_out_norms and not any(_OFFICIAL_OUT_NORM.match(k) for k in target):
        for k in list(sd):
            m = _OFFICIAL_OUT_NORM.match(k)
            if m:
                norm_sd[f"out_norms.{int(m.group(1)) // 2}.{m.group(2)}"] = sd.pop(k)
    if not all(k in sd for k in target):
        fn = _family_filter(model_name)
        if fn is not None:
            if reference is None:
                raise ValueError("a reference model is needed to convert an official checkpoint")
            try:
                sd = dict(fn(sd, reference))
            except CheckpointError as e:
                raise CheckpointError(f"{source}: {e}") from e
    ref_keys = set(reference.state_dict()) if reference is not None else set()
    drop = (ref_keys - set(target)) | {k for k in sd if k.startswith(("head.", "fc.", "classifier."))}
    sd = {k: v for k, v in sd.items() if k not in drop or k in target}
    missing = sorted(k for k in target if k not in sd)
    unexpected = sorted(k for k in sd if k not in target)
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in sd.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        raise misfit_error(f"{source} does not fit the {model_name} backbone:", missing, unexpected, shapes,
                           "Is it a checkpoint of this variant (depths/dims) and family? Nothing was loaded.",
                           limits=(6, 6, 3))
    return sd, norm_sd


# --- layer-wise lr decay -----------------------------------------------------------------------------------------
_DEFAULT_MATCHER = dict(
    stem=r"^stem",
    blocks=[(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
)


def layer_id_map(trunk: nn.Module) -> Tuple[Dict[str, int], int]:
    """({param name: layer id}, number of layers) from the model's ``group_matcher`` (stem = 0, then each block in
    order), or the stem/stages/blocks layout when the model has none (timm's MetaFormer / MambaOut)."""
    matcher = trunk.group_matcher(coarse=False) if hasattr(trunk, "group_matcher") else _DEFAULT_MATCHER
    ids = group_parameters(trunk, matcher, reverse=True)
    # params no rule matched get the largest id (timm puts them in the last group)
    ids = {n: int(ids[n]) if n in ids else None for n, _ in trunk.named_parameters()}
    known = [v for v in ids.values() if v is not None]
    top = max(known) if known else 0
    ids = {n: (top if v is None else v) for n, v in ids.items()}
    return ids, top + 1


# --- the adapter -------------------------------------------------------------------------------------------------
class DenseBackboneMixin:
    """Shared implementation; the host class is an ``nn.Module`` and calls ``_setup_backbone`` in ``__init__``."""

    def _setup_backbone(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            drop_path_rate: Optional[float] = None,
            out_norms: Union[bool, str, Sequence[Any]] = "official",
            out_norm_skip: Sequence[int] = (),
            pad_input: bool = True,
            with_cp: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
    ):
        if not timm.is_model(model_name.split(".")[0]):
            raise ValueError(f"unknown model {model_name!r}: not registered with timm (is its family installed? "
                             f"`python -m metaformer_zoo list` shows the zoo)")
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        if drop_path_rate is not None:
            self.model_kwargs["drop_path_rate"] = drop_path_rate
        self.model_kwargs.pop("pretrained", None)
        model = timm.create_model(model_name, pretrained=False, **self.model_kwargs)
        n = len(model.feature_info)
        out_indices = tuple(int(i) + n if int(i) < 0 else int(i) for i in out_indices)
        if not out_indices or any(i < 0 or i >= n for i in out_indices) or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"out_indices {out_indices} must be increasing stage indices in [0, {n - 1}] "
                             f"({model_name} has {n} stages)")
        if frozen_stages >= n:
            raise ValueError(f"frozen_stages={frozen_stages} but {model_name} has only {n} stages (max {n - 1})")
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.pad_input = pad_input
        self.num_stages = n
        info = [dict(f) for f in model.feature_info]
        self.out_channels = tuple(info[i]["num_chs"] for i in out_indices)
        self.out_strides = tuple(info[i]["reduction"] for i in out_indices)
        self.input_divisor = max(int(getattr(model, "input_divisor", 1) or 1), 1)
        self.min_input_size = int(getattr(model, "min_input_size", 0) or 0)
        model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        if with_cp:
            model.set_grad_checkpointing(True)
        self.model = model
        norms = resolve_out_norms(model_name, out_indices, self.out_channels, out_norms, out_norm_skip)
        self.out_norms = nn.ModuleList([n if n is not None else nn.Identity() for n in norms])
        self._freeze_stages()

    # --- structure helpers ---
    def _stage_modules(self) -> List[nn.Module]:
        """Modules of stage i (0-based) for freezing: the stem belongs to stage 0 (to the 'stem' of mmdet)."""
        return list(self.model.stages)

    def _stem_modules(self) -> List[nn.Module]:
        stem = getattr(self.model, "stem", None)
        return [stem] if stem is not None else []

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        mods = self._stem_modules() + self._stage_modules()[:self.frozen_stages + 1]
        for m in mods:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def _apply_train_mode(self, mode: bool):
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    # --- checkpoints ---
    def load_checkpoint(self, checkpoint: Union[str, Mapping[str, torch.Tensor]], prefix: Optional[str] = None,
                        map_location: str = "cpu"):
        """Strictly load a zoo / timm / official checkpoint (path or state dict) into the trunk (and out norms)."""
        source = checkpoint if isinstance(checkpoint, str) else "state dict"
        if isinstance(checkpoint, str) and (checkpoint == "timm" or checkpoint.startswith("timm:")):
            # the model's own pretrained cfg (url / hf hub / file), e.g. 'timm' or 'timm:caformer_s18.sail_in22k'
            name = checkpoint[len("timm:"):] or self.model_name
            if name.split(".")[0] != self.model_name.split(".")[0]:
                raise CheckpointError(f"checkpoint {checkpoint!r} names another architecture than {self.model_name}")
            raw = timm.create_model(name, pretrained=True, **self.model_kwargs).state_dict()
        elif isinstance(checkpoint, str):
            raw = _read_checkpoint(checkpoint, map_location)
        else:
            raw = checkpoint

        def _reference(device):
            return timm.create_model(self.model_name, pretrained=False, device=device, **self.model_kwargs)
        try:
            trunk_sd, norm_sd = prepare_trunk_state_dict(
                raw, self.model_name, self.model, reference=_reference("meta"),
                num_out_norms=len(self.out_norms), source=str(source), prefix=prefix)
        except (CheckpointError, ValueError):
            raise
        except Exception:  # a filter that needs real tensors: retry with a CPU reference model
            trunk_sd, norm_sd = prepare_trunk_state_dict(
                raw, self.model_name, self.model, reference=_reference("cpu"),
                num_out_norms=len(self.out_norms), source=str(source), prefix=prefix)
        if norm_sd:
            own = self.out_norms.state_dict()
            norm_sd = {k[len("out_norms."):]: v for k, v in norm_sd.items()}
            bad = sorted(set(norm_sd) ^ set(own)) or [k for k in own if own[k].shape != norm_sd[k].shape]
            if bad:
                raise CheckpointError(f"{source}: the checkpoint's output norms do not fit this adapter "
                                      f"(out_norms / out_indices differ): {', '.join(bad[:6])}. Nothing was loaded.")
        self.model.load_state_dict(trunk_sd, strict=True)
        if norm_sd:
            self.out_norms.load_state_dict(norm_sd, strict=True)
        return self

    # --- forward ---
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        d = self.input_divisor
        th = max(-(-H // d) * d, self.min_input_size)
        tw = max(-(-W // d) * d, self.min_input_size)
        th, tw = -(-th // d) * d, -(-tw // d) * d
        if (th, tw) != (H, W):
            x = F.pad(x, (0, tw - W, 0, th - H))
        return x

    def _forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        H, W = x.shape[-2:]
        padded = self._pad(x) if self.pad_input else x
        feats = self.model.forward_intermediates(
            padded, indices=list(self.out_indices), intermediates_only=True, stop_early=True)
        if len(feats) != len(self.out_indices):
            raise RuntimeError(f"{self.model_name}.forward_intermediates returned {len(feats)} maps for out_indices "
                               f"{self.out_indices}")
        outs = []
        for f, norm, r in zip(feats, self.out_norms, self.out_strides):
            if padded is not x:  # crop the padding back off: the map covers ceil(H / stride) x ceil(W / stride)
                f = f[..., :-(-H // r), :-(-W // r)]
            outs.append(norm(f))
        return tuple(outs)


def _read_checkpoint(path: str, map_location: str = "cpu"):
    """Read an ``init_cfg`` checkpoint with the safe reader of every zoo loading path (``load_checkpoint_file``).

    ``http(s)://`` files are fetched into timm's / torch.hub's cache (``$TORCH_HOME/hub/checkpoints``, the cache that
    ``pretrained=True`` uses) and read from there; other schemes (``open-mmlab://``, ``s3://`` ...) go through
    mmengine's ``CheckpointLoader`` with the zoo's weights-only allow-list active.
    """
    if re.match(r"^https?://", path):
        try:
            path = download_cached_file(path, check_hash=False, progress=False)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"cannot fetch {path}: {type(e).__name__}: {e}. Without network, download the file "
                                  f"elsewhere and pass its local path as the checkpoint. Nothing was loaded.") from e
    elif re.match(r"^[a-z0-9+.-]+://", path):
        try:
            from mmengine.runner.checkpoint import CheckpointLoader
        except ImportError as e:
            raise CheckpointError(f"cannot fetch {path}: remote checkpoints need mmengine (or download the file)") from e
        try:
            with allow_safe_globals():
                return CheckpointLoader.load_checkpoint(path, map_location=map_location)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Download it and pass the "
                                  f"local path for a precise diagnosis. Nothing was loaded.") from e
    return load_checkpoint_file(path, map_location)


class DenseBackbone(DenseBackboneMixin, nn.Module):
    """Framework-free backbone (same arguments as ``MetaFormerZooBackbone`` minus ``init_cfg``; ``checkpoint=``
    loads weights strictly at construction)."""

    def __init__(self, model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = False, drop_path_rate: Optional[float] = None,
                 out_norms: Union[bool, str, Sequence[Any]] = "official", out_norm_skip: Sequence[int] = (),
                 pad_input: bool = True, with_cp: bool = False, model_kwargs: Optional[Dict[str, Any]] = None,
                 checkpoint: Optional[str] = None):
        nn.Module.__init__(self)
        self._setup_backbone(model_name, out_indices, frozen_stages, norm_eval, drop_path_rate, out_norms,
                             out_norm_skip, pad_input, with_cp, model_kwargs)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def train(self, mode: bool = True):
        super().train(mode)
        self._apply_train_mode(mode)
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self._forward_features(x)

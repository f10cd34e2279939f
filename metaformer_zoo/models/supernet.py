"""``zoo_supernet``: a mixer supernet, one MetaFormer whose every block holds several candidate token mixers.

Each block is an ordinary ``MetaFormerBlock`` (its norms, MLP and scales are shared by all candidates) whose
``token_mixer`` is a ``MixerChoice``: an ``nn.ModuleDict`` of candidate mixers (any registered names) and the name of
the active one. A *placement* chooses one mixer per block; ``model.set_placement(p)`` switches it at run time::

    model = timm.create_model("zoo_supernet", mixers=["pooling", "sepconv", "attention"], num_classes=10)
    model.set_placement("fast")                                       # a preset name
    model.set_placement(["pooling", "sepconv", "attention", "attention"])  # one mixer per stage
    model.set_placement([["pooling", "pooling"], ["sepconv"] * 2, ["sepconv"] * 6, ["attention"] * 2])  # per block
    plain = model.export("balanced")                                  # an ordinary zoo_metaformer, same outputs

Candidates are listed from the cheapest to the most expensive: the *smallest* placement uses every stage's first
candidate, the *largest* its last (the two ends of the sandwich rule, ``sample_placements``). ``model.presets`` maps
names to placements (defaults: ``fast`` = smallest, ``accurate`` = largest, ``balanced`` = a stage-wise ramp between
them); the presets are stored in the state dict (the ``preset_table`` buffer, JSON bytes), so training checkpoints,
``save_for_hf`` / ``local-dir:`` folders and ``tools/placement_search.py`` keep them with the weights.

Training: ``tools/train.py --recipe supernet_digits`` (``--sandwich N``: each step trains the largest, the smallest
and N random placements, the largest's softmax distilling into the others).
"""
import inspect
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

from ..mixers import create_mixer, get_mixer
from ..skeleton import MetaFormer
from ..spec import FamilySpec, Variant
from ..zoo import register_family
from ._baselines import CFG, IDENTITY

__all__ = ["MixerChoice", "MetaFormerSupernet", "Placement", "SPEC"]

# canonical form: one tuple of mixer names per stage, one name per block
Placement = Tuple[Tuple[str, ...], ...]
PlacementLike = Union[str, Sequence[Union[str, Sequence[str]]]]

DEFAULT_MIXERS = ("pooling", "sepconv", "attention")


class MixerChoice(nn.Module):
    """The token mixer of a supernet block: candidate mixers by name (``candidates``) and the active one.

    Only the active candidate runs; the others keep their weights. State-dict keys are
    ``candidates.<name>.<mixer keys>``.
    """

    def __init__(self, dim: int, names: Sequence[str], feat_size: Tuple[int, int] = (14, 14), stage_idx: int = 0,
                 block_idx: int = 0, proj_drop: float = 0., candidate_kwargs: Optional[Dict[str, Dict]] = None):
        super().__init__()
        if not names:
            raise ValueError("a MixerChoice needs at least one candidate mixer name")
        context = dict(feat_size=feat_size, stage_idx=stage_idx, block_idx=block_idx, proj_drop=proj_drop)
        kw = candidate_kwargs or {}
        self.candidates = nn.ModuleDict({n: create_mixer(n, dim, context=dict(context), **dict(kw.get(n) or {}))
                                         for n in names})
        self.active = str(names[-1])

    def set_active(self, name: str):
        if name not in self.candidates:
            raise ValueError(f"{name!r} is not a candidate of this block; candidates: {', '.join(self.candidates)}")
        self.active = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.candidates[self.active](x)

    def extra_repr(self) -> str:
        return f"active={self.active!r}"


def _choice_factory(names: Tuple[str, ...], candidate_kwargs: Optional[Dict[str, Dict]] = None):
    """A mixer factory (named parameters, as ``create_mixer`` requires) building a ``MixerChoice`` of ``names``."""

    def mixer_choice(dim: int, feat_size: Tuple[int, int] = (14, 14), stage_idx: int = 0, block_idx: int = 0,
                     proj_drop: float = 0.) -> MixerChoice:
        return MixerChoice(dim, names, feat_size=feat_size, stage_idx=stage_idx, block_idx=block_idx,
                           proj_drop=proj_drop, candidate_kwargs=candidate_kwargs)

    mixer_choice.__qualname__ = f"MixerChoice{list(names)}"
    return mixer_choice


def _metaformer_defaults() -> Dict[str, Any]:
    sig = inspect.signature(MetaFormer.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self"}


class MetaFormerSupernet(MetaFormer):
    """A ``MetaFormer`` whose blocks each hold candidate token mixers (``MixerChoice``); see the module docstring.

    Args:
        mixers: candidate mixer names (registry names, cheapest first) for every block, or one list per stage.
        presets: name -> placement; None: ``fast`` / ``balanced`` / ``accurate`` derived from the candidates.
        placement: the active placement at construction (a preset name or a placement); None: ``accurate``.
        candidate_kwargs: mixer name -> constructor kwargs of that candidate in every block (e.g.
            ``{"hydra": dict(headdim=16)}``); candidates not named are built with their defaults. ``export``
            passes them on as the plain model's per-block ``mixer_kwargs``.
        **kwargs: every other ``MetaFormer`` argument (depths, dims, norms, scales, head ...) except
            ``token_mixers`` / ``mixer_kwargs``.
    """

    def __init__(
            self,
            mixers: Sequence[Union[str, Sequence[str]]] = DEFAULT_MIXERS,
            presets: Optional[Dict[str, PlacementLike]] = None,
            placement: Optional[PlacementLike] = None,
            candidate_kwargs: Optional[Dict[str, Dict[str, Any]]] = None,
            **kwargs,
    ):
        for bad in ("token_mixers", "mixer_kwargs"):
            if bad in kwargs:
                raise TypeError(f"zoo_supernet takes candidate mixers as mixers=[...] (one list for every stage or "
                                f"one per stage), not {bad}=")
        args = _metaformer_defaults()
        unknown = [k for k in kwargs if k not in args]
        if unknown:
            raise TypeError(f"zoo_supernet got unknown kwarg(s) {unknown}; it accepts mixers, presets, placement and "
                            f"candidate_kwargs and the MetaFormer arguments: "
                            f"{', '.join(k for k in args if k not in ('token_mixers', 'mixer_kwargs'))}")
        args.update(kwargs)
        depths = list(args["depths"])
        num_stages = len(depths)
        if isinstance(mixers, str):
            mixers = [mixers]
        mixers = list(mixers)
        if mixers and all(isinstance(m, str) for m in mixers):
            stage_mixers = [tuple(mixers)] * num_stages
        elif len(mixers) == num_stages and all(isinstance(m, (list, tuple)) and m for m in mixers):
            stage_mixers = [tuple(m) for m in mixers]
        else:
            raise ValueError(f"mixers must be a list of candidate mixer names (every stage) or {num_stages} such "
                             f"lists (one per stage), got {mixers!r}")
        for names in stage_mixers:
            for n in names:
                if not isinstance(n, str):
                    raise TypeError(f"zoo_supernet candidates are registry names (strings), got {n!r}")
                get_mixer(n)  # unknown names raise, listing the registered mixers
            if len(set(names)) != len(names):
                raise ValueError(f"candidate list {list(names)} names a mixer twice")
        candidate_kwargs = {str(k): dict(v or {}) for k, v in (candidate_kwargs or {}).items()}
        stray = sorted(set(candidate_kwargs) - {n for names in stage_mixers for n in names})
        if stray:
            raise ValueError(f"candidate_kwargs names {stray}, which no stage has as a candidate; candidates: "
                             f"{sorted({n for names in stage_mixers for n in names})}")
        args["token_mixers"] = [_choice_factory(names, candidate_kwargs) for names in stage_mixers]
        args["mixer_kwargs"] = None
        super().__init__(**args)
        self.stage_mixers: Tuple[Tuple[str, ...], ...] = tuple(stage_mixers)
        self.candidate_kwargs: Dict[str, Dict[str, Any]] = candidate_kwargs
        self.depths = tuple(depths)
        self._metaformer_args = {k: v for k, v in args.items() if k not in ("token_mixers", "mixer_kwargs")}
        self.register_buffer("preset_table", torch.zeros(0, dtype=torch.uint8), persistent=True)
        self._preset_cache: Optional[Tuple[bytes, Dict[str, Placement]]] = None
        self.presets = self.default_presets() if presets is None else presets
        self.set_placement("accurate" if placement is None and "accurate" in self.presets else
                           placement if placement is not None else self.largest_placement())

    # --- placements ------------------------------------------------------------------------------------------------
    def _blocks(self):
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage.blocks):
                yield i, j, block.token_mixer

    def smallest_placement(self) -> Placement:
        """Every block runs its stage's first (cheapest) candidate."""
        return tuple((names[0],) * d for names, d in zip(self.stage_mixers, self.depths))

    def largest_placement(self) -> Placement:
        """Every block runs its stage's last (most expensive) candidate."""
        return tuple((names[-1],) * d for names, d in zip(self.stage_mixers, self.depths))

    def default_presets(self) -> Dict[str, Placement]:
        """``fast`` (smallest), ``balanced`` (stage i runs candidate round(i (k - 1) / (S - 1))), ``accurate``."""
        n = len(self.depths)
        balanced = []
        for i, (names, d) in enumerate(zip(self.stage_mixers, self.depths)):
            k = len(names)
            idx = int(round(i * (k - 1) / (n - 1))) if n > 1 else k // 2
            balanced.append((names[idx],) * d)
        return dict(fast=self.smallest_placement(), balanced=tuple(balanced), accurate=self.largest_placement())

    def normalize_placement(self, placement: PlacementLike) -> Placement:
        """A preset name, one name per stage, or one list of names per stage (one per block) -> canonical form."""
        if isinstance(placement, str):
            presets = self.presets
            if placement not in presets:
                raise ValueError(f"unknown placement preset {placement!r}; presets: {', '.join(presets)} (or give "
                                 f"one mixer name per stage / per block)")
            return presets[placement]
        placement = list(placement)
        if len(placement) != len(self.depths):
            raise ValueError(f"a placement has one entry per stage ({len(self.depths)}), got {len(placement)}: "
                             f"{placement!r}")
        out = []
        for i, (entry, names, d) in enumerate(zip(placement, self.stage_mixers, self.depths)):
            blocks = (entry,) * d if isinstance(entry, str) else tuple(entry)
            if len(blocks) != d:
                raise ValueError(f"placement stage {i} lists {len(blocks)} mixers but the stage has {d} blocks")
            for b in blocks:
                if b not in names:
                    raise ValueError(f"placement stage {i}: {b!r} is not a candidate of this stage; candidates: "
                                     f"{', '.join(names)}")
            out.append(tuple(blocks))
        return tuple(out)

    @property
    def placement(self) -> Placement:
        """The active placement (one tuple of mixer names per stage)."""
        out = [[] for _ in self.depths]
        for i, _, choice in self._blocks():
            out[i].append(choice.active)
        return tuple(tuple(s) for s in out)

    def set_placement(self, placement: PlacementLike) -> Placement:
        """Switch every block to the placement's mixer (no reload); returns the canonical placement."""
        p = self.normalize_placement(placement)
        for i, j, choice in self._blocks():
            choice.set_active(p[i][j])
        return p

    def sample_placements(self, n_random: int = 2, generator: Optional[torch.Generator] = None) -> List[Placement]:
        """The sandwich rule: ``[largest, smallest, n_random uniformly random placements]`` (largest first: it is the
        distillation teacher of the others). Pass a seeded ``generator`` so every DDP rank samples the same."""
        out = [self.largest_placement(), self.smallest_placement()]
        for _ in range(n_random):
            p = []
            for names, d in zip(self.stage_mixers, self.depths):
                idx = torch.randint(len(names), (d,), generator=generator).tolist()
                p.append(tuple(names[k] for k in idx))
            out.append(tuple(p))
        return out

    # --- presets, stored in the state dict --------------------------------------------------------------------------
    @property
    def presets(self) -> Dict[str, Placement]:
        """Preset name -> placement, read from the ``preset_table`` buffer (so loaded checkpoints bring theirs)."""
        if self.preset_table.is_meta:  # no data on the meta device: the presets last set
            return dict(self._preset_cache[1]) if self._preset_cache is not None else {}
        raw = bytes(self.preset_table.cpu().tolist())
        if self._preset_cache is None or self._preset_cache[0] != raw:
            table = json.loads(raw.decode("utf-8")) if raw else {}
            self._preset_cache = (raw, {k: tuple(tuple(s) for s in v) for k, v in table.items()})
        return dict(self._preset_cache[1])

    @presets.setter
    def presets(self, presets: Dict[str, PlacementLike]):
        if not isinstance(presets, dict):
            raise TypeError(f"presets must be a dict of name -> placement, got {type(presets).__name__}")
        canon = {}
        for name, p in presets.items():
            if isinstance(p, str):
                raise ValueError(f"preset {name!r}: give a placement (names per stage or per block), not a name")
            canon[str(name)] = self.normalize_placement(p)
        raw = json.dumps({k: [list(s) for s in v] for k, v in canon.items()}).encode("utf-8")
        self.preset_table = torch.tensor(list(raw), dtype=torch.uint8, device=self.preset_table.device)
        self._preset_cache = (raw, canon)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "preset_table"
        if key in state_dict and state_dict[key].shape != self.preset_table.shape:
            self.preset_table = torch.zeros_like(state_dict[key], dtype=torch.uint8, device=self.preset_table.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # --- export ----------------------------------------------------------------------------------------------------
    def export_kwargs(self, placement: Optional[PlacementLike] = None) -> Dict[str, Any]:
        """``zoo_metaformer`` kwargs of the plain model of ``placement`` (default: the active one)."""
        p = self.placement if placement is None else self.normalize_placement(placement)
        kwargs = dict(self._metaformer_args)
        kwargs["num_classes"] = self.num_classes
        kwargs["token_mixers"] = [s[0] if len(set(s)) == 1 else list(s) for s in p]
        if self.candidate_kwargs:
            per_block = [[self.candidate_kwargs.get(n) or None for n in s] for s in p]
            kwargs["mixer_kwargs"] = [b[0] if all(x == b[0] for x in b) else b for b in per_block]
        for k in ("depths", "dims"):
            kwargs[k] = list(kwargs[k])
        return kwargs

    def export(self, placement: Optional[PlacementLike] = None) -> nn.Module:
        """An ordinary ``zoo_metaformer`` timm model running ``placement`` with exactly this model's weights for it
        (the other candidates and the preset table are dropped); same outputs as the supernet set to ``placement``."""
        p = self.placement if placement is None else self.normalize_placement(placement)
        plain = timm.create_model("zoo_metaformer", pretrained=False, **self.export_kwargs(p))
        plain.load_state_dict(self.placement_state_dict(p), strict=True)
        return plain.train(self.training)

    def placement_state_dict(self, placement: PlacementLike) -> Dict[str, torch.Tensor]:
        """The state dict of the plain model of ``placement`` (zoo_metaformer keys)."""
        p = self.normalize_placement(placement)
        out = {}
        for k, v in self.state_dict().items():
            if k == "preset_table":
                continue
            if ".token_mixer.candidates." in k:
                head, rest = k.split(".token_mixer.candidates.", 1)
                name, tail = rest.split(".", 1)
                i, j = int(head.split(".")[1]), int(head.split(".")[3])
                if name != p[i][j]:
                    continue
                k = f"{head}.token_mixer.{tail}"
            out[k] = v
        return out


SPEC = FamilySpec(
    name="supernet", model_cls=MetaFormerSupernet, **IDENTITY,
    cfg=dict(CFG, url=""),  # no weights
    recipe="supernet_digits", card="supernet",
    notes="mixer supernet: candidate token mixers in every block, placement chosen at run time (set_placement, "
          "presets); export(p) gives a plain zoo_metaformer; no pretrained weights",
    models=(
        Variant("zoo_supernet", dict(
            depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), mixers=DEFAULT_MIXERS,
            mlp_act="starrelu", mlp_bias=False, norm_layers="layernorm2d_nobias", downsample_norm="layernorm2d_nobias",
            res_scale_init_values=(None, None, 1.0, 1.0),
        ), params=21_655_064, macs=5_587_007_488),  # the default placement (accurate) at 224 x 224
    ),
)
register_family(SPEC, __name__)

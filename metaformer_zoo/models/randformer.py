"""RandFormer (MetaFormer Baselines for Vision, arXiv 2210.13452; sail-sg/metaformer).

Identity mixer in stages 1-2, frozen random token mixing (``RandomMixing``) in stages 3-4. Each block draws its own
row-softmaxed (N, N) matrix, a persistent buffer (a ``requires_grad=False`` parameter in the official code; same
state-dict key, counted by ``metaformer_zoo.zoo.count_frozen_buffers``): trained models need their checkpoint. The
matrices fix the token count, so the model is built for ``img_size`` (224: 196 / 49 tokens) and raises a clear error
at other sizes, unless created with ``random_mixing_resize=True`` (documented resampling of the matrices, see
``metaformer_zoo.mixers.basic.RandomMixing``). A spec over the shared ``MetaFormer``; ``build`` only maps
``random_mixing_resize`` to the mixers' kwargs. Drop path per variant is in ``configs/train/randformer.yaml``.
"""
from typing import Any

from ..builder import build_zoo_model
from ..skeleton import MetaFormer
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family
from ._baselines import BASE_ARGS, CFG, IDENTITY, SIZES, checkpoint_filter_fn, official_state_dict, official_tags

__all__ = ["SPEC", "checkpoint_filter_fn"]

_SOURCE = "sail-sg/metaformer README"


def _build(spec: FamilySpec, variant: Variant, pretrained: bool = False, random_mixing_resize: bool = False,
           **kwargs: Any) -> MetaFormer:
    """``random_mixing_resize=True``: the random mixers resample their matrices at other token grids (an explicit
    ``mixer_kwargs`` wins)."""
    if random_mixing_resize:
        rand = dict(resize=True)
        kwargs.setdefault("mixer_kwargs", (None, None, rand, rand))
    return build_zoo_model(spec.model_cls, variant.name, pretrained, pretrained_filter_fn=spec.official.filter,
                           **dict(variant.kwargs, **kwargs))


def _variant(size: str, params: int, frozen_params: int, macs: int, top1: float) -> Variant:
    name = f"randformer_{size}"
    return Variant(name, dict(SIZES[size], token_mixers=("identity", "identity", "random", "random"), **BASE_ARGS),
                   params=params, frozen_params=frozen_params, macs=macs, top1=top1, top1_source=_SOURCE,
                   tags=official_tags("randformer", name))


SPEC = FamilySpec(
    name="randformer", model_cls=MetaFormer, build=_build, **IDENTITY, cfg=dict(CFG, fixed_input_size=True),
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict),
    # sail-sg/metaformer has no dense code (reference/metaformer.md section 7.2): nothing declared, adapter default
    dense_out_norms=None,
    recipe="randformer", card="randformer",
    notes="frozen random mixing matrices fix the input size (224 px)",
    models=(
        _variant("s12", 12_127_010, 235_298, 1_888_484_352, 76.6),
        _variant("s24", 21_812_060, 470_596, 3_544_643_584, 78.2),
        _variant("s36", 31_497_110, 705_894, 5_200_802_816, 79.5),
        _variant("m36", 56_783_062, 705_894, 9_035_383_296, 81.2),
        _variant("m48", 74_287_248, 941_192, 11_902_113_792, 81.4),
    ),
)
register_family(SPEC, __name__)

"""IdentityFormer (MetaFormer Baselines for Vision, arXiv 2210.13452; sail-sg/metaformer).

PoolFormerV2 with the identity token mixer: the block still adds ``norm1(x)`` to its residual. timm has no
IdentityFormer; the state-dict layout is timm's MetaFormer layout, so official checkpoints convert with the same rules.
A spec over the shared ``MetaFormer`` (no own modules). Drop path per variant is in the recipe
(``configs/train/identityformer.yaml``, from the official training scripts).
"""
from ..skeleton import MetaFormer
from ..spec import FamilySpec, OfficialFormat, Variant
from ..zoo import register_family
from ._baselines import BASE_ARGS, CFG, IDENTITY, SIZES, checkpoint_filter_fn, official_state_dict, official_tags

__all__ = ["SPEC", "checkpoint_filter_fn"]

_SOURCE = "sail-sg/metaformer README"


def _variant(size: str, params: int, macs: int, top1: float) -> Variant:
    name = f"identityformer_{size}"
    return Variant(name, dict(SIZES[size], token_mixers="identity", **BASE_ARGS), params=params, macs=macs,
                   top1=top1, top1_source=_SOURCE, tags=official_tags("identityformer", name))


SPEC = FamilySpec(
    name="identityformer", model_cls=MetaFormer, **IDENTITY, cfg=CFG,
    official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict),
    # sail-sg/metaformer has no dense code (reference/metaformer.md section 7.2): nothing declared, adapter default
    dense_out_norms=None,
    recipe="identityformer", card="identityformer",
    models=(
        _variant("s12", 11_891_712, 1_812_267_008, 74.6),
        _variant("s24", 21_341_464, 3_392_208_896, 78.2),
        _variant("s36", 30_791_216, 4_972_150_784, 79.3),
        _variant("m36", 56_077_168, 8_758_788_096, 80.0),
        _variant("m48", 73_346_056, 11_533_320_192, 80.4),
    ),
)
register_family(SPEC, __name__)

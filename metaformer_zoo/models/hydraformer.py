"""HydraFormer: the MetaFormer baselines with Hydra, the bidirectional quasiseparable matrix mixer, in stages 3-4.

Hydra (Hwang, Lahoti, Dao, Gu 2024, "Hydra: Bidirectional State Space Models Through Generalized Matrix
Mixers", arXiv 2407.09941, goombalab/hydra) is the non-causal SSM the matrix-mixer view found best for non-causal
data; the mixer is ``metaformer_zoo.mixers.hydra.Hydra`` (the official block, official defaults). The family places
it like CAFormer places attention: ``sepconv`` in stages 1-2, ``hydra`` in stages 3-4, on the s12 / s24 / s36 shapes
and macro design of the MetaFormer baselines (IdentityFormer / RandFormer: ``_baselines.SIZES`` / ``BASE_ARGS``), so it
sits in the same tables and trains with the same recipe. A zoo composition: no official classifier and no weights.
"""

from ..skeleton import MetaFormer
from ..spec import FamilySpec, Variant
from ..zoo import register_family
from ._baselines import BASE_ARGS, SIZES

__all__ = ["SPEC"]

CITATION = """@article{hwang2024hydra,
  title={Hydra: Bidirectional State Space Models Through Generalized Matrix Mixers},
  author={Hwang, Sukjun and Lahoti, Aakash and Dao, Tri and Gu, Albert},
  journal={arXiv preprint arXiv:2407.09941},
  year={2024}
}"""

MIXERS = ("sepconv", "sepconv", "hydra", "hydra")

# params / MACs (FlopCounterMode FLOPs / 2) at 224 x 224, counted with metaformer_zoo.zoo.measure_variant
_COUNTS = {
    "s12": (19_890_972, 3_645_539_072),
    "s24": (37_339_984, 7_058_753_024),
    "s36": (54_788_996, 10_471_966_976),
}


def _variant(size: str) -> Variant:
    params, macs = _COUNTS[size]
    return Variant(f"hydraformer_{size}", dict(**SIZES[size], token_mixers=MIXERS, **BASE_ARGS),
                   params=params, macs=macs, tags={"": {}})


SPEC = FamilySpec(
    name="hydraformer", model_cls=MetaFormer,
    code="https://github.com/goombalab/hydra", citation=CITATION,
    cfg=dict(crop_pct=1.0),
    official=None, dense_out_norms=("layernorm2d",) * 4, recipe="hydraformer", card="hydraformer",
    notes="zoo composition (sepconv stages 1-2, hydra stages 3-4, MetaFormer-baselines s12/s24/s36 shapes); no "
          "weights: goombalab/hydra has no image classifier",
    models=tuple(_variant(s) for s in ("s12", "s24", "s36")),
)
register_family(SPEC, __name__)

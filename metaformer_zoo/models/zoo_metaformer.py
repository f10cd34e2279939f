"""``zoo_metaformer``: the generic, composable MetaFormer of the zoo (family ``composed``).

Any registered token mixer per stage, from any family (``metaformer_zoo.mixers.list_mixers()``)::

    timm.create_model("zoo_metaformer", token_mixers=["pooling", "sepconv", "attention", "attention"],
                      depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), num_classes=10)

Defaults are a CAFormer-S18-like layout (SepConv, SepConv, Attention, Attention) with a Linear head. There are no
pretrained weights for compositions; every argument of ``metaformer_zoo.MetaFormer`` is a model kwarg. The bundled
``digits`` recipe trains it.
"""
from ..skeleton import MetaFormer
from ..spec import FamilySpec, Variant
from ..zoo import register_family
from ._baselines import CFG, IDENTITY

__all__ = ["SPEC"]

SPEC = FamilySpec(
    name="composed", model_cls=MetaFormer, **IDENTITY,
    cfg=dict(CFG, url=""),  # no weights (an empty url, as timm writes for weightless cfgs)
    recipe="digits",
    notes="generic skeleton: token mixers of any family per stage, passed as model kwargs; no pretrained weights",
    models=(
        Variant("zoo_metaformer", dict(
            depths=(3, 3, 9, 3), dims=(64, 128, 320, 512),
            token_mixers=("sepconv", "sepconv", "attention", "attention"),
            mlp_act="starrelu", mlp_bias=False, norm_layers="layernorm2d_nobias", downsample_norm="layernorm2d_nobias",
            res_scale_init_values=(None, None, 1.0, 1.0),
        ), params=23_750_936, macs=4_104_356_864),
    ),
)
register_family(SPEC, __name__)

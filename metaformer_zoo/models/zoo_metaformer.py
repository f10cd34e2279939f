"""``zoo_metaformer``: the generic, composable MetaFormer of the zoo.

Any registered token mixer per stage, from any family (``metaformer_zoo.mixers.list_mixers()``)::

    timm.create_model("zoo_metaformer", token_mixers=["pooling", "sepconv", "attention", "attention"],
                      depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), num_classes=10)

Defaults are a CAFormer-S18-like layout (SepConv, SepConv, Attention, Attention) with a Linear head. There are no
pretrained weights for compositions; every argument of ``metaformer_zoo.MetaFormer`` is a model kwarg.
"""
from timm.models import generate_default_cfgs, register_model

from ..builder import build_zoo_model
from ..skeleton import MetaFormer
from ..zoo import register_family
from ._baselines import cfg

default_cfgs = generate_default_cfgs({
    "zoo_metaformer": cfg(paper_ids="arXiv:2210.13452", origin_url="https://github.com/sail-sg/metaformer"),
})

register_family("composed", ["zoo_metaformer"], paper="MetaFormer Baselines for Vision (arXiv 2210.13452)",
                notes="generic skeleton: token mixers of any family per stage, passed as model kwargs")


@register_model
def zoo_metaformer(pretrained=False, **kwargs) -> MetaFormer:
    model_args = dict(
        depths=(3, 3, 9, 3), dims=(64, 128, 320, 512), token_mixers=("sepconv", "sepconv", "attention", "attention"),
        mlp_act="starrelu", mlp_bias=False, norm_layers="layernorm2d_nobias", downsample_norm="layernorm2d_nobias",
        res_scale_init_values=(None, None, 1.0, 1.0),
    )
    return build_zoo_model(MetaFormer, "zoo_metaformer", pretrained, **dict(model_args, **kwargs))

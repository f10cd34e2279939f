"""IdentityFormer (MetaFormer Baselines for Vision, arXiv 2210.13452; sail-sg/metaformer).

PoolFormerV2 with the identity token mixer: the block still adds ``norm1(x)`` to its residual. timm has no
IdentityFormer; the state-dict layout is timm's MetaFormer layout, so official checkpoints convert with the same rules.
"""
from timm.models import generate_default_cfgs, register_model

from ..builder import build_zoo_model
from ..skeleton import MetaFormer
from ..zoo import register_family
from ._baselines import BASE_ARGS, SIZES, cfg, checkpoint_filter_fn, official_state_dict, official_url

__all__ = ["checkpoint_filter_fn"]

DROP_PATH = {"s12": 0.1, "s24": 0.1, "s36": 0.2, "m36": 0.3, "m48": 0.4}  # official training scripts

default_cfgs = generate_default_cfgs({
    f"identityformer_{s}.sail_in1k": cfg(url=official_url("identityformer", f"identityformer_{s}"))
    for s in SIZES
})

register_family(
    "identityformer", [f"identityformer_{s}" for s in SIZES],
    paper="MetaFormer Baselines for Vision (arXiv 2210.13452)", code="https://github.com/sail-sg/metaformer",
    filter_fn=checkpoint_filter_fn, to_official=official_state_dict, official_wrapper=None,
)


def _create(variant: str, pretrained: bool = False, **kwargs) -> MetaFormer:
    depths, dims = SIZES[variant.split("_")[-1]]
    model_args = dict(depths=depths, dims=dims, token_mixers="identity", **BASE_ARGS)
    return build_zoo_model(MetaFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                           **dict(model_args, **kwargs))


@register_model
def identityformer_s12(pretrained=False, **kwargs) -> MetaFormer:
    return _create("identityformer_s12", pretrained, **kwargs)


@register_model
def identityformer_s24(pretrained=False, **kwargs) -> MetaFormer:
    return _create("identityformer_s24", pretrained, **kwargs)


@register_model
def identityformer_s36(pretrained=False, **kwargs) -> MetaFormer:
    return _create("identityformer_s36", pretrained, **kwargs)


@register_model
def identityformer_m36(pretrained=False, **kwargs) -> MetaFormer:
    return _create("identityformer_m36", pretrained, **kwargs)


@register_model
def identityformer_m48(pretrained=False, **kwargs) -> MetaFormer:
    return _create("identityformer_m48", pretrained, **kwargs)

"""RandFormer (MetaFormer Baselines for Vision, arXiv 2210.13452; sail-sg/metaformer).

Identity mixer in stages 1-2, frozen random token mixing (``RandomMixing``) in stages 3-4. Each block draws its own
row-softmaxed (N, N) matrix, a persistent buffer (a ``requires_grad=False`` parameter in the official code; same
state-dict key, counted by ``metaformer_zoo.zoo.count_frozen_buffers``): trained models need their checkpoint. The
matrices fix the token count, so the model is built for ``img_size`` (224: 196 / 49 tokens) and raises a clear error
at other sizes, unless created with ``random_mixing_resize=True`` (documented resampling of the matrices, see
``metaformer_zoo.mixers.basic.RandomMixing``).
"""
from timm.models import generate_default_cfgs, register_model

from ..builder import build_zoo_model
from ..skeleton import MetaFormer
from ..zoo import register_family
from ._baselines import BASE_ARGS, SIZES, cfg, checkpoint_filter_fn, official_state_dict, official_url

__all__ = ["checkpoint_filter_fn"]

DROP_PATH = {"s12": 0.1, "s24": 0.1, "s36": 0.2, "m36": 0.3, "m48": 0.3}  # official training scripts

default_cfgs = generate_default_cfgs({
    f"randformer_{s}.sail_in1k": cfg(url=official_url("randformer", f"randformer_{s}"), fixed_input_size=True)
    for s in SIZES
})

register_family(
    "randformer", [f"randformer_{s}" for s in SIZES],
    paper="MetaFormer Baselines for Vision (arXiv 2210.13452)", code="https://github.com/sail-sg/metaformer",
    notes="frozen random mixing matrices fix the input size (224 px)",
    filter_fn=checkpoint_filter_fn, to_official=official_state_dict, official_wrapper=None,
)


def _create(variant: str, pretrained: bool = False, random_mixing_resize: bool = False, **kwargs) -> MetaFormer:
    depths, dims = SIZES[variant.split("_")[-1]]
    rand = dict(resize=random_mixing_resize)
    model_args = dict(depths=depths, dims=dims, token_mixers=("identity", "identity", "random", "random"),
                      mixer_kwargs=(None, None, rand, rand), **BASE_ARGS)
    return build_zoo_model(MetaFormer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                           **dict(model_args, **kwargs))


@register_model
def randformer_s12(pretrained=False, **kwargs) -> MetaFormer:
    return _create("randformer_s12", pretrained, **kwargs)


@register_model
def randformer_s24(pretrained=False, **kwargs) -> MetaFormer:
    return _create("randformer_s24", pretrained, **kwargs)


@register_model
def randformer_s36(pretrained=False, **kwargs) -> MetaFormer:
    return _create("randformer_s36", pretrained, **kwargs)


@register_model
def randformer_m36(pretrained=False, **kwargs) -> MetaFormer:
    return _create("randformer_m36", pretrained, **kwargs)


@register_model
def randformer_m48(pretrained=False, **kwargs) -> MetaFormer:
    return _create("randformer_m48", pretrained, **kwargs)

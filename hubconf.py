"""torch.hub entry points for metaformer-zoo.

    model = torch.hub.load("/path/to/metaformer-zoo", "identityformer_s12", source="local")
    model = torch.hub.load("/path/to/metaformer-zoo", "caformer_s18", source="local", pretrained=True)

Every model the zoo registers with timm and every catalogued timm-owned variant (PoolFormer v1/v2, ConvFormer,
CAFormer, MambaOut) is an entry point; each calls ``timm.create_model(name, pretrained=..., **kwargs)``, so timm
kwargs (``num_classes``, ``features_only``, ``pretrained_cfg_overlay=dict(file=...)``, ``checkpoint_path=`` ...) work
as usual; official checkpoint files of zoo families load through both, read and converted exactly as by timm.

    model = torch.hub.load("/path/to/metaformer-zoo", "msmlp_tiny", source="local",
                           checkpoint_path="msmlp_tiny_patch4_ckpt_epoch299.pth")   # official release file
"""
dependencies = ["torch", "timm"]

import timm as _timm  # noqa: E402

import metaformer_zoo as _zoo  # noqa: E402  (registers the zoo with timm)
from metaformer_zoo.zoo import list_variants as _list_variants, zoo_registered_models as _zoo_models  # noqa: E402


def _make_entrypoint(name):
    def entrypoint(pretrained=False, **kwargs):
        return _timm.create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"timm.create_model({name!r}, pretrained=pretrained, **kwargs) (metaformer-zoo {_zoo.__version__})"
    return entrypoint


_NAMES = sorted(set(_zoo_models()) | {n for n in _list_variants(owner="timm") if _timm.models.is_model(n)})
for _name in _NAMES:
    if not _name.startswith("_"):
        globals()[_name] = _make_entrypoint(_name)
del _name

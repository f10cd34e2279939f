"""The zoo catalogue: every family of the mission with its variants, params and MACs.

Each family module calls ``register_family`` next to its ``@register_model`` functions. Families that timm already
owns (PoolFormer v1/v2, ConvFormer, CAFormer, MambaOut) are catalogued here too (``owner="timm"``): the zoo lists and
serves them but never re-registers their names with timm.

Families are listed in ``FAMILY_ORDER`` (the order of the README's Families table: timm's MetaFormer families, then
the zoo families from the MetaFormer baselines to the MLP / frequency / scan models, then the composed model); a
family registered outside that list comes after them, in registration order.

Params and MACs at each variant's default input size are declared in its spec (``Variant.params`` / ``macs``, the
official numbers), so listing counts nothing; ``check_catalogue`` (``python -m metaformer_zoo check``, run by a slow
test) counts every variant and compares.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .spec import FamilySpec, register_entrypoints

__all__ = ["Family", "FAMILY_ORDER", "register_family", "list_families", "list_variants",
           "family_of", "variant_info", "count_params", "count_frozen_buffers", "count_macs", "measure_variant",
           "load_catalogue", "check_catalogue", "declared_row", "published_results", "zoo_registered_models"]

FAMILY_ORDER: Tuple[str, ...] = (
    "poolformer", "poolformerv2", "convformer", "caformer", "mambaout",  # timm's own
    "identityformer", "randformer", "iformer", "transxnet", "affnet", "raftmlp", "msmlp", "stripmlp", "vim2",
    "hydraformer", "supernet", "composed",
)


Family = FamilySpec  # the catalogue's entries are the families' own declarations

_FAMILIES: Dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, module: Optional[str] = None) -> FamilySpec:
    """Put a family's ``FamilySpec`` in the catalogue; with ``module`` (the family module's ``__name__``) also register
    its ``default_cfgs`` and entrypoints with timm (``metaformer_zoo.spec.register_entrypoints``).

    A family module calls it once, after its modules: ``register_family(SPEC, __name__)``. timm-owned families are
    registered without ``module`` (catalogued only: their names stay timm's).
    """
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family takes a metaformer_zoo.spec.FamilySpec, got {type(spec).__name__}")
    if spec.name in _FAMILIES:
        raise ValueError(f"family {spec.name!r} is already in the zoo catalogue")
    for other in _FAMILIES.values():
        clash = set(other.variants) & set(spec.variants)
        if clash:
            raise ValueError(f"family {spec.name!r} declares {sorted(clash)}, already in family {other.name!r}")
    if spec.owner == "timm" and module is not None:
        raise ValueError(f"family {spec.name!r} is timm's own: catalogue it without registering entrypoints")
    if spec.owner == "timm":
        stolen = [n for n in spec.variants if not timm.is_model(n)]
        if stolen:
            raise ValueError(f"timm-owned family {spec.name!r} lists names timm does not register: {stolen}")
    if spec.owner == "zoo" and module is None:
        raise ValueError(f"family {spec.name!r}: pass the family module's __name__ to register its entrypoints")
    _FAMILIES[spec.name] = spec
    if module is not None:
        register_entrypoints(spec, module)
    return spec


def _family_rank(name: str) -> int:
    return FAMILY_ORDER.index(name) if name in FAMILY_ORDER else len(FAMILY_ORDER)


def list_families() -> List[Family]:
    """Every catalogued family in ``FAMILY_ORDER``; families outside it follow in registration order."""
    return sorted(_FAMILIES.values(), key=lambda f: _family_rank(f.name))  # sorted() is stable


def list_variants(family: Optional[str] = None, owner: Optional[str] = None) -> List[str]:
    if family is not None and family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(f.name for f in list_families())}")
    out = []
    for fam in list_families():
        if family is not None and fam.name != family:
            continue
        if owner is not None and fam.owner != owner:
            continue
        out.extend(fam.variants)
    return out


def family_of(model_name: str) -> Family:
    arch = model_name.split(".")[0]
    for fam in _FAMILIES.values():
        if arch in fam.variants:
            return fam
    raise ValueError(f"{model_name!r} is not a zoo variant; see `python -m metaformer_zoo list`")


def zoo_registered_models() -> List[str]:
    """Names that metaformer_zoo itself registers with timm (every catalogued zoo-owned variant + generic models)."""
    return sorted(n for n in timm.list_models()
                  if timm.models.model_entrypoint(n).__module__.startswith("metaformer_zoo."))


def count_frozen_buffers(model: torch.nn.Module) -> int:
    """Elements of the frozen weights a model keeps as buffers (e.g. RandFormer's random mixing matrices).

    A module names such buffers in a ``frozen_buffers`` attribute (a tuple of buffer names). Other buffers (norm
    running statistics, index tables) are not weights and are not counted.
    """
    return sum(mod.get_buffer(name).numel() for mod in model.modules() for name in getattr(mod, "frozen_buffers", ()))


def count_params(model: torch.nn.Module) -> Tuple[int, int]:
    """(total, trainable): total = every parameter + frozen weight buffers (``count_frozen_buffers``), the official
    ``sum(p.numel() for p in model.parameters())`` of codebases that keep frozen weights as parameters; trainable =
    parameters with ``requires_grad``."""
    total = sum(p.numel() for p in model.parameters()) + count_frozen_buffers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def count_macs(model: torch.nn.Module, input_size: Sequence[int] = (3, 224, 224), device="cpu") -> int:
    """MACs of one forward pass at ``input_size`` as ``FlopCounterMode`` FLOPs / 2 (matmul, conv, bmm, SDPA only).

    This is the counting rule of the reference tables (norms, pooling, activations, FFTs are not counted).
    """
    x = torch.zeros((1, *input_size), device=device)
    model = model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def _pretrained_cfg(name: str) -> Dict:
    cfg = timm.models.get_pretrained_cfg(name) if timm.models.is_model(name.split(".")[0]) else None
    return cfg.to_dict() if cfg is not None else {}


def _default_input_size(name: str) -> Tuple[int, ...]:
    return tuple(_pretrained_cfg(name).get("input_size", (3, 224, 224)))


def measure_variant(name: str, macs: bool = True) -> Dict:
    """Count one variant now: build it on the meta device, count params (``count_params``, ``count_frozen_buffers``)
    and, with ``macs=True``, MACs (``count_macs``) at its default input size."""
    input_size = _default_input_size(name)
    model = timm.create_model(name, device="meta")
    total, trainable = count_params(model)
    return dict(input_size=list(input_size), params=total, trainable_params=trainable,
                frozen_buffers=count_frozen_buffers(model),
                macs=count_macs(model, input_size, device="meta") if macs else None)


def declared_row(name: str) -> Optional[Dict]:
    """The catalogue row a family spec declares for variant ``name`` (official params incl. frozen tensors, MACs at
    the default input size), or None when the spec leaves params or MACs out (then ``variant_info`` counts)."""
    v = family_of(name).variant(name)
    if v.params is None or v.macs is None:
        return None
    return dict(input_size=list(_default_input_size(name)), params=v.params, trainable_params=v.params - v.frozen_params,
                frozen_buffers=v.frozen_params, macs=v.macs)


def load_catalogue() -> Dict[str, Dict]:
    """{name: declared row} for every catalogued variant whose spec declares params and MACs."""
    rows = {n: declared_row(n) for n in list_variants()}
    return {n: r for n, r in rows.items() if r is not None}


def check_catalogue(names: Optional[Sequence[str]] = None, progress=None) -> List[str]:
    """Count every variant now (``measure_variant``) and compare with what its spec declares; returns one line per
    mismatch (empty: the specs are right). ``progress`` wraps the name list (e.g. ``tqdm``)."""
    names = list(list_variants() if names is None else names)
    bad = []
    for n in (progress(names) if progress else names):
        declared, fresh = declared_row(n), measure_variant(n)
        if declared != fresh:
            bad.append(f"{n}: spec declares {declared}, counted {fresh}")
    return bad


def published_results() -> Dict[str, Tuple[float, str]]:
    """{name: (top-1, source)} of every variant whose spec declares a published ImageNet-1k top-1."""
    out = {}
    for fam in list_families():
        for v in fam.models:
            if v.top1 is not None:
                out[v.name] = (v.top1, v.top1_source)
    return out


def variant_info(name: str, macs: bool = True, recompute: bool = False) -> Dict:
    """Family, params, MACs at the default resolution and weight availability of one variant.

    Params and MACs come from the family spec when it declares them (``source="catalogue"``), else they are counted
    now (``source="measured"``, also with ``recompute=True``). ``params`` is the total of ``count_params`` (frozen buffers included, as in the official
    counts), ``trainable_params`` and ``frozen_buffers`` its parts.
    """
    fam = family_of(name)
    cfg = _pretrained_cfg(name)
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    row = None if recompute else declared_row(name)
    if row is not None and tuple(row["input_size"]) == input_size and (row["macs"] is not None or not macs):
        source = "catalogue"
    else:
        row, source = measure_variant(name, macs=macs), "measured"
    return dict(
        name=name, family=fam.name, owner=fam.owner, params=row["params"], trainable_params=row["trainable_params"],
        frozen_buffers=row["frozen_buffers"], input_size=input_size, macs=row["macs"] if macs else None,
        weights=bool(cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("file")),
        weights_source=cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or "", source=source,
    )

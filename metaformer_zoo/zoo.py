"""The zoo catalogue: every family of the mission with its variants, params and MACs.

Each family module calls ``register_family`` next to its ``@register_model`` functions. Families that timm already
owns (PoolFormer v1/v2, ConvFormer, CAFormer, MambaOut) are catalogued here too (``owner="timm"``): the zoo lists and
serves them but never re-registers their names with timm.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Family", "register_family", "list_families", "list_variants", "family_of", "variant_info",
           "count_params", "count_macs", "zoo_registered_models"]


@dataclass
class Family:
    name: str
    variants: List[str]
    owner: str = "zoo"  # "zoo": registered by metaformer_zoo; "timm": timm's own models, used as they are
    paper: str = ""
    code: str = ""
    card: str = ""  # model_cards/<card>.md
    notes: str = ""
    extra: Dict = field(default_factory=dict)


_FAMILIES: Dict[str, Family] = {}


def register_family(name: str, variants: Sequence[str], owner: str = "zoo", paper: str = "", code: str = "",
                    card: Optional[str] = None, notes: str = "", **extra) -> Family:
    if name in _FAMILIES:
        raise ValueError(f"family {name!r} is already in the zoo catalogue")
    fam = Family(name, list(variants), owner, paper, code, card or name, notes, dict(extra))
    _FAMILIES[name] = fam
    return fam


def list_families() -> List[Family]:
    return list(_FAMILIES.values())


def list_variants(family: Optional[str] = None, owner: Optional[str] = None) -> List[str]:
    out = []
    for fam in _FAMILIES.values():
        if family is not None and fam.name != family:
            continue
        if owner is not None and fam.owner != owner:
            continue
        out.extend(fam.variants)
    if family is not None and family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(_FAMILIES)}")
    return out


def family_of(model_name: str) -> Family:
    arch = model_name.split(".")[0]
    for fam in _FAMILIES.values():
        if arch in fam.variants:
            return fam
    raise ValueError(f"{model_name!r} is not a zoo variant; see `python -m metaformer_zoo list`")


def zoo_registered_models() -> List[str]:
    """Names that metaformer_zoo itself registers with timm (every catalogued zoo-owned variant + generic models)."""
    import timm
    return sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("metaformer_zoo."))


def count_params(model: torch.nn.Module) -> Tuple[int, int]:
    """(total, trainable) parameter counts; frozen tensors such as RandFormer's mixing matrices count as total only."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def count_macs(model: torch.nn.Module, input_size: Sequence[int] = (3, 224, 224), device="cpu") -> int:
    """MACs of one forward pass at ``input_size`` as ``FlopCounterMode`` FLOPs / 2 (matmul, conv, bmm, SDPA only).

    This is the counting rule of the reference tables (norms, pooling, activations, FFTs are not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros((1, *input_size), device=device)
    model = model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def variant_info(name: str, macs: bool = True) -> Dict:
    """Family, params, MACs at the default resolution and weight availability of one variant."""
    import timm
    fam = family_of(name)
    cfg = timm.models.get_pretrained_cfg(name) if timm.models.is_model(name) else None
    cfg = cfg.to_dict() if cfg is not None else {}
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    model = timm.create_model(name, device="meta")
    total, trainable = count_params(model)
    info = dict(
        name=name, family=fam.name, owner=fam.owner, params=total, trainable_params=trainable,
        input_size=input_size, macs=None,
        weights=bool(cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("file")),
        weights_source=cfg.get("hf_hub_id") or cfg.get("url") or "",
    )
    if macs:
        info["macs"] = count_macs(model, input_size, device="meta")
    return info

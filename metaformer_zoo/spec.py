"""Family declarations: one typed, frozen ``FamilySpec`` per family, the single source every consumer reads.

A family module declares its modules, then one spec, and registers it::

    SPEC = FamilySpec(
        name="identityformer", model_cls=MetaFormer,
        citation=CITATION, arxiv="2210.13452", code="https://github.com/sail-sg/metaformer",  # paper: from the BibTeX
        cfg=dict(crop_pct=1.0),  # only what differs from DEFAULT_CFG
        official=OfficialFormat(filter=checkpoint_filter_fn, to_official=official_state_dict),
        dense_out_norms=("layernorm2d",) * 4, recipe="identityformer", card="identityformer",
        models=(Variant("identityformer_s12", dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512)),
                          params=11_891_712, top1=74.6, tags={"sail_in1k": dict(url=...)}), ...),
    )
    register_family(SPEC, __name__)

``register_family`` derives what timm needs (the module's ``default_cfgs`` and one ``@register_model`` entrypoint per
variant, named and tagged exactly as declared) and puts the spec in the catalogue (``metaformer_zoo.zoo``). Everything
else (catalogue rows, hub conversion and export, dense per-output norms and the mmdet/mmseg config set, results.csv,
citations, card checks) reads the spec. Families timm already owns are declared with ``owner="timm"``: catalogued and
converted, never registered with timm again.
"""
import re
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from .builder import build_zoo_model

__all__ = ["NormSpec", "Variant", "OfficialFormat", "FamilySpec", "register_entrypoints"]

# a per-output norm of the dense adapter: None (no norm), a norm name of metaformer_zoo.layers, or
# dict(type=name, **kwargs) such as dict(type="groupnorm", num_groups=1, eps=1e-5)
NormSpec = Union[None, str, Mapping[str, Any]]

StateDict = Dict[str, torch.Tensor]

# the pretrained-cfg fields a family's ``cfg`` starts from (timm's usual ``_cfg`` defaults for an ImageNet classifier
# at 224 px with a stride-32 trunk); a family declares only what differs
DEFAULT_CFG = MappingProxyType(dict(
    input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="stem.conv", classifier="head.fc"))


def _frozen(d: Optional[Mapping]) -> Mapping:
    return MappingProxyType(dict(d or {}))


# journal names without a parenthesised acronym in the BibTeX
_JOURNALS = {"IEEE Transactions on Pattern Analysis and Machine Intelligence": "TPAMI",
             "IEEE Transactions on Neural Networks and Learning Systems": "IEEE TNNLS"}
_ARXIV_ID = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


def bibtex_field(bibtex: str, key: str) -> str:
    """The value of a one-line ``key = {...}`` (or ``"..."``) field of a BibTeX entry, braces dropped; "" if absent."""
    m = re.search(rf"^\s*{key}\s*=\s*[{{\"](.*?)[}}\"]\s*,?\s*$", bibtex, re.M | re.I)
    return m.group(1).replace("{", "").replace("}", "").strip() if m else ""


def paper_of(bibtex: str) -> Tuple[str, str, str]:
    """(title, "title (venue year)", arXiv id or "") of a BibTeX entry: the venue is the booktitle's acronym in
    parentheses, a known journal's acronym, or "arXiv"."""
    title, year = bibtex_field(bibtex, "title"), bibtex_field(bibtex, "year")
    journal = bibtex_field(bibtex, "journal")
    m = re.search(r"\(([^()]+)\)\s*$", bibtex_field(bibtex, "booktitle"))
    arxiv = bibtex_field(bibtex, "eprint") if bibtex_field(bibtex, "archivePrefix").lower() == "arxiv" else ""
    in_journal = _ARXIV_ID.search(journal)
    arxiv = arxiv or (in_journal.group(1) if in_journal else "")
    venue = m.group(1) if m else _JOURNALS.get(journal) or ("arXiv" if arxiv else journal)
    return title, f"{title} ({venue} {year})" if venue else title, arxiv


@dataclass(frozen=True)
class Variant:
    """One registered model name of a family.

    ``kwargs`` are the family model class's constructor arguments for this variant (the shared vocabulary: ``depths``,
    ``dims``, ``mlp_ratios``, ``drop_path_rate`` ...). ``params`` / ``macs`` / ``top1`` are the official numbers at the
    family's default input size (``macs``: FlopCounterMode FLOPs / 2); ``None`` where none is published. ``tags`` maps
    each pretrained tag to the cfg fields that differ from the family's ``cfg`` (``url``, ``hf_hub_id``,
    ``input_size`` ...); the first tag is the default. An empty tag (``""``) registers the bare name.
    """
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    params: Optional[int] = None
    frozen_params: int = 0  # non-trainable tensors of the official model (registered as buffers in the zoo)
    macs: Optional[int] = None
    top1: Optional[float] = None
    top1_source: str = ""
    tags: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"": {}})

    def __post_init__(self):
        object.__setattr__(self, "kwargs", _frozen(self.kwargs))
        if not self.tags:
            raise ValueError(f"variant {self.name!r} declares no pretrained tag (use tags={{'': {{}}}})")
        object.__setattr__(self, "tags", MappingProxyType({t: _frozen(c) for t, c in self.tags.items()}))

    @property
    def has_weights(self) -> bool:
        return any(c.get("url") or c.get("hf_hub_id") or c.get("file") for c in self.tags.values())


@dataclass(frozen=True)
class OfficialFormat:
    """How the family's official checkpoints are laid out, with one signature per function.

    * ``read(path) -> state_dict``: read an official file safely (``torch.load(weights_only=True)`` with the zoo's
      allow-list) and return its tensors; the default reader handles plain and wrapped state dicts.
    * ``filter(state_dict, model) -> state_dict``: official (or already zoo) layout -> the model's layout, validated
      strictly (``CheckpointError`` on any misfit; nothing is loaded partially).
    * ``to_official(model) -> state_dict``: the inverse, for synthetic official files in tests and for export; None
      where no official code exists.
    * ``wrapper``: the key the official file stores its state dict under (``"model"``, ``"state_dict"``), None = plain.
    """
    filter: Callable[[Mapping[str, torch.Tensor], nn.Module], StateDict]
    to_official: Optional[Callable[[nn.Module], StateDict]] = None
    read: Optional[Callable[[str], StateDict]] = None
    wrapper: Optional[str] = None


@dataclass(frozen=True)
class FamilySpec:
    """The one declaration of a family; see the module docstring."""
    name: str
    models: Tuple[Variant, ...]
    model_cls: Optional[type] = None
    owner: str = "zoo"  # "zoo": registered by metaformer_zoo; "timm": timm's own models, catalogued only
    # identity: ``paper`` ("title (venue year)") and ``arxiv`` are read from the BibTeX ``citation`` where it holds
    # them; give them only where it does not (e.g. a journal version without its arXiv id)
    paper: str = ""
    arxiv: str = ""  # e.g. "2210.13452"
    code: str = ""  # official code URL
    license: str = "apache-2.0"
    citation: str = ""  # BibTeX
    title: str = field(default="", init=False)  # the paper's title (from the BibTeX), timm's ``paper_name``
    # pretrained-cfg fields shared by every variant, over DEFAULT_CFG
    cfg: Mapping[str, Any] = field(default_factory=dict)
    official: Optional[OfficialFormat] = None
    dense_out_norms: Optional[Tuple[NormSpec, ...]] = None  # per stage; None = not declared (adapter default)
    feature_cfg: Mapping[str, Any] = field(default_factory=dict)  # extra timm feature_cfg (e.g. feature_cls)
    recipe: str = ""  # configs/train/<recipe>.yaml
    card: str = ""  # model_cards/<card>.md
    notes: str = ""
    # builder(spec, variant, pretrained, **kwargs) -> model, for families whose construction is not
    # ``build_zoo_model(model_cls, name, pretrained, **variant.kwargs, **kwargs)``
    build: Optional[Callable[..., nn.Module]] = None

    def __post_init__(self):
        if self.owner not in ("zoo", "timm"):
            raise ValueError(f"family {self.name!r}: owner must be 'zoo' or 'timm', got {self.owner!r}")
        object.__setattr__(self, "models", tuple(self.models))
        names = [v.name for v in self.models]
        if not names:
            raise ValueError(f"family {self.name!r} declares no variant")
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name!r} declares a variant twice: {names}")
        if self.owner == "zoo" and self.model_cls is None and self.build is None:
            raise ValueError(f"family {self.name!r} needs model_cls (or build) to register its variants")
        if self.dense_out_norms is not None:
            object.__setattr__(self, "dense_out_norms", tuple(self.dense_out_norms))
        title, paper, arxiv = paper_of(self.citation) if self.citation else (self.paper, self.paper, "")
        object.__setattr__(self, "paper", self.paper or paper)
        object.__setattr__(self, "arxiv", self.arxiv or arxiv)
        object.__setattr__(self, "title", title or self.paper)
        object.__setattr__(self, "cfg", _frozen(self.cfg))
        object.__setattr__(self, "feature_cfg", _frozen(self.feature_cfg))
        object.__setattr__(self, "card", self.card or self.name)

    # ---- lookups ------------------------------------------------------------------------------------------------
    @property
    def variants(self) -> Tuple[str, ...]:
        """The registered model names, in declaration order."""
        return tuple(v.name for v in self.models)

    def variant(self, name: str) -> Variant:
        arch = name.split(".")[0]
        for v in self.models:
            if v.name == arch:
                return v
        raise ValueError(f"{name!r} is not a {self.name} variant; variants: {', '.join(self.variants)}")

    # ---- what timm needs ----------------------------------------------------------------------------------------
    def pretrained_cfgs(self) -> Dict[str, Dict[str, Any]]:
        """``{"name.tag": cfg}`` for ``timm.models.generate_default_cfgs`` (the first tag of a variant is its default)."""
        base = dict(num_classes=1000, **DEFAULT_CFG, license=self.license, origin_url=self.code,
                    paper_ids=f"arXiv:{self.arxiv}" if self.arxiv else "", paper_name=self.title)
        base.update(self.cfg)
        out = {}
        for v in self.models:
            for tag, over in v.tags.items():
                out[f"{v.name}.{tag}" if tag else v.name] = dict(base, **over)
        return out

    def create(self, name: str, pretrained: bool = False, **kwargs) -> nn.Module:
        """Build variant ``name`` (what its timm entrypoint calls)."""
        variant = self.variant(name)
        if self.build is not None:
            return self.build(self, variant, pretrained, **kwargs)
        return build_zoo_model(
            self.model_cls, variant.name, pretrained,
            pretrained_filter_fn=self.official.filter if self.official is not None else None,
            feature_cfg=dict(self.feature_cfg) or None, **dict(variant.kwargs, **kwargs))


def register_entrypoints(spec: FamilySpec, module_name: str) -> None:
    """timm's registration for a zoo family: the module's ``default_cfgs`` and one entrypoint per variant.

    The entrypoints are ordinary functions of ``module_name`` (``timm.models.model_entrypoint(name).__module__`` is the
    family module), registered with ``timm.models.register_model`` after ``default_cfgs`` is set, so names and tags
    are exactly those declared.
    """
    module = sys.modules[module_name]
    module.default_cfgs = generate_default_cfgs(spec.pretrained_cfgs())
    for v in spec.models:
        fn = _entrypoint(spec, v.name)
        fn.__module__ = module_name
        fn.__name__ = fn.__qualname__ = v.name
        fn.__doc__ = f"{v.name}: {spec.paper or spec.name}" + (f" (arXiv {spec.arxiv})" if spec.arxiv else "")
        setattr(module, v.name, register_model(fn))


def _entrypoint(spec: FamilySpec, name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return spec.create(name, pretrained, **kwargs)

    return entrypoint

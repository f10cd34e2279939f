"""Families that timm already owns: catalogued by the zoo, served from timm, never re-registered.

Re-registering a timm name overwrites timm's entry and drops its pretrained tags, so the zoo only lists these
variants (for ``python -m metaformer_zoo list``, the dense adapters, configs and model cards). Known differences of
timm's implementation from the official code are recorded in the model cards (e.g. PoolFormer v1 head norm after
pooling, Conv/CAFormer MLP-head LayerNorm eps 1e-6 instead of 1e-5).
"""
from ..zoo import register_family

_SIZES_POOL = ("s12", "s24", "s36", "m36", "m48")
_SIZES_CONV = ("s18", "s36", "m36", "b36")

register_family("poolformer", [f"poolformer_{s}" for s in _SIZES_POOL], owner="timm",
                paper="MetaFormer Is Actually What You Need for Vision (arXiv 2111.11418)",
                code="https://github.com/sail-sg/poolformer")
register_family("poolformerv2", [f"poolformerv2_{s}" for s in _SIZES_POOL], owner="timm", card="poolformer",
                paper="MetaFormer Baselines for Vision (arXiv 2210.13452)", code="https://github.com/sail-sg/metaformer")
register_family("convformer", [f"convformer_{s}" for s in _SIZES_CONV], owner="timm", card="convformer_caformer",
                paper="MetaFormer Baselines for Vision (arXiv 2210.13452)", code="https://github.com/sail-sg/metaformer")
register_family("caformer", [f"caformer_{s}" for s in _SIZES_CONV], owner="timm", card="convformer_caformer",
                paper="MetaFormer Baselines for Vision (arXiv 2210.13452)", code="https://github.com/sail-sg/metaformer")
register_family("mambaout", [f"mambaout_{s}" for s in ("femto", "kobe", "tiny", "small", "base")], owner="timm",
                paper="MambaOut: Do We Really Need Mamba for Vision? (arXiv 2405.07992)",
                code="https://github.com/yuweihao/MambaOut")

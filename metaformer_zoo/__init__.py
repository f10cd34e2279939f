"""metaformer-zoo: MetaFormer-style vision backbones for timm.

``import metaformer_zoo`` registers every zoo model with timm, so ``timm.create_model("identityformer_s12")``,
``features_only=True`` and ``pretrained=True`` work like for timm's own models. Families that timm already owns
(PoolFormer v1/v2, ConvFormer, CAFormer, MambaOut) are used from timm and never re-registered.
"""
import importlib.abc
import importlib.util
import os
import sys

from .version import __version__


class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
    """Serve the repository's top-level ``kernels/`` folder as ``metaformer_zoo.kernels`` in a source checkout.

    An installed wheel carries ``metaformer_zoo/kernels`` itself (see setup.py). When the package is imported
    straight from a checkout (``PYTHONPATH=.``, a git worktree, an editable install of another checkout), the
    kernels must come from *this* checkout's ``kernels/`` folder, so this finder answers before the others.
    """

    def __init__(self, kernels_dir):
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            os.path.join(self.kernels_dir, "__init__.py"),
            submodule_search_locations=[self.kernels_dir],
        )


def _install_kernels_finder():
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return  # installed layout: metaformer_zoo/kernels exists
    src = os.path.join(os.path.dirname(here), "kernels")
    if os.path.isfile(os.path.join(src, "__init__.py")):
        sys.meta_path.insert(0, _SourceKernelsFinder(src))


_install_kernels_finder()

from . import layers, mixers  # noqa: E402
from . import models  # noqa: E402,F401  (registers every zoo model with timm)
from .skeleton import MetaFormer, MetaFormerBase  # noqa: E402
from .zoo import list_families, list_variants, family_of, variant_info  # noqa: E402

__all__ = [
    "__version__", "MetaFormer", "MetaFormerBase", "list_families", "list_variants", "family_of", "variant_info",
]

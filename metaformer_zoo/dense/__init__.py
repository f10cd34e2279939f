"""Dense prediction (mmdetection 3.x / mmsegmentation 1.x) for every zoo family.

``import metaformer_zoo.dense`` (done by the configs through ``custom_imports``) registers into mmengine's ROOT
registries, so the names resolve under ``default_scope='mmdet'`` and ``'mmseg'`` alike and build without
``mmcv._ext``:

* ``MetaFormerZooBackbone`` (``MODELS``): any zoo / timm model as a backbone returning a tuple of NCHW maps::

      backbone=dict(type='MetaFormerZooBackbone', model_name='caformer_s18', out_indices=(0, 1, 2, 3),
                    frozen_stages=-1, norm_eval=False, drop_path_rate=0.1, out_norms='official',
                    init_cfg=dict(type='Pretrained', checkpoint='caformer_s18.pth'))

* ``MetaFormerZooLayerDecayOptimizerConstructor`` (``OPTIM_WRAPPER_CONSTRUCTORS``): layer-wise lr decay driven by
  the backbone's ``group_matcher`` (stem = layer 0, then each block).

Without mmengine only the framework-free pieces (``metaformer_zoo.dense.core``: ``DenseBackbone``, out-norm
selection, checkpoint preparation) are available. ``import metaformer_zoo`` never imports this package.
"""
from .core import (DEFAULT_OUT_NORM, DenseBackbone, layer_id_map, prepare_trunk_state_dict,  # noqa: F401
                   resolve_out_norms, strip_prefixes)

try:
    import mmengine  # noqa: F401
    _HAS_MMENGINE = True
except ImportError:  # pragma: no cover - exercised in environments without the mm stack
    _HAS_MMENGINE = False

if _HAS_MMENGINE:
    from .mm import MetaFormerZooBackbone, MetaFormerZooLayerDecayOptimizerConstructor  # noqa: F401

__all__ = ["DEFAULT_OUT_NORM", "DenseBackbone", "MetaFormerZooBackbone", "MetaFormerZooLayerDecayOptimizerConstructor",
           "layer_id_map", "prepare_trunk_state_dict", "resolve_out_norms", "strip_prefixes", "config_dir"]


def __getattr__(name):
    if name in ("MetaFormerZooBackbone", "MetaFormerZooLayerDecayOptimizerConstructor"):
        raise ImportError(f"metaformer_zoo.dense.{name} needs mmengine (and mmcv/mmdet/mmseg to train): run "
                          f"`bash tools/install_mm.sh` or `pip install metaformer-zoo[mm]` plus mmcv 2.1.0 with ops")
    raise AttributeError(name)


def config_dir() -> str:
    """The repository's ``configs/`` folder (mmdet/, mmseg/) in a source checkout."""
    import os
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

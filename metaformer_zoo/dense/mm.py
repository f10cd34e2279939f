"""mmengine-registered backbone adapter, layer-wise lr decay constructor and the task bases' backbone entry (see
``metaformer_zoo.dense``)."""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

from .core import DenseBackboneMixin, layer_id_map

__all__ = ["MetaFormerZooBackbone", "MetaFormerZooLayerDecayOptimizerConstructor", "zoo_backbone_cfg"]


def zoo_backbone_cfg(**options) -> dict:
    """The ``model.backbone`` entry of the task bases (``configs/mmdet/_base_/*_zoo.py``, ``configs/mmseg/_base_/``):
    a ``MetaFormerZooBackbone`` in place of the packaged base's ResNet (``_delete_``), all four stages, nothing
    frozen, the family's official output norms and timm's ImageNet weights through the model's pretrained cfg
    (``'timm'`` or ``'timm:<name>.<tag>'``; a path / URL of a zoo, timm or official checkpoint also works, loaded
    strictly, head dropped). ``options`` add or replace entries (RetinaNet: ``out_norm_skip=(0, )``); the per-model
    configs set ``model_name`` and ``drop_path_rate``.

    The task bases call it from Python (an mmengine config is Python; the function itself does not reach the merged
    config): a shared ``_base_`` cannot carry the entry, since mmengine refuses a ``model`` key in two sibling bases
    and any other key of a base would stay in every merged config.
    """
    cfg = dict(_delete_=True, type="MetaFormerZooBackbone", model_name="caformer_s18", out_indices=(0, 1, 2, 3),
               frozen_stages=-1, norm_eval=False, drop_path_rate=0.1, out_norms="official")
    cfg.update(options)
    cfg.setdefault("init_cfg", dict(type="Pretrained", checkpoint="timm"))
    return cfg


@MODELS.register_module()
class MetaFormerZooBackbone(DenseBackboneMixin, BaseModule):
    """Any zoo / timm MetaFormer-style model as an mmdet / mmseg backbone (tuple of NCHW maps).

    Args:
        model_name: registered timm name (``caformer_s18``, ``transxnet_t``, ``randformer_s12`` ...).
        out_indices: stages whose outputs are returned (strides ``feature_info[i]['reduction']``, 4/8/16/32).
        frozen_stages: freeze the stem and stages ``<= frozen_stages`` (no grad, eval mode, kept in ``train()``);
            -1 freezes nothing.
        norm_eval: keep every BatchNorm of the backbone in eval mode while training.
        drop_path_rate: stochastic depth of the trunk (None = the model's default).
        out_norms: per-output norm, ``'official'`` (default) / True / False / a norm name / a per-output list; see
            ``metaformer_zoo.dense.core``.
        out_norm_skip: output indices whose norm is Identity (official RetinaNet ``start_level=1`` mode: ``(0,)``).
        pad_input: zero-pad the input (right/bottom) to the family's size rules (``input_divisor``,
            ``min_input_size``) and crop the maps back to ``ceil(H / stride)``.
        with_cp: gradient checkpointing in the trunk.
        model_kwargs: extra ``timm.create_model`` kwargs (e.g. ``dict(random_mixing_resize=True)`` for RandFormer).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL, prefix=None)`` loads a zoo, timm or official
            checkpoint strictly through the family's ``checkpoint_filter_fn`` (head keys dropped); a checkpoint that
            does not fit raises ``CheckpointError`` and nothing is loaded.
        pretrained: deprecated alias of ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            drop_path_rate: Optional[float] = None,
            out_norms: Union[bool, str, Sequence[Any]] = "official",
            out_norm_skip: Sequence[int] = (),
            pad_input: bool = True,
            with_cp: bool = False,
            model_kwargs: Optional[Dict[str, Any]] = None,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Union[dict, List[dict]]] = None,
    ):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("give either pretrained= or init_cfg=, not both")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        BaseModule.__init__(self, init_cfg=init_cfg)
        self._setup_backbone(model_name, out_indices, frozen_stages, norm_eval, drop_path_rate, out_norms,
                             out_norm_skip, pad_input, with_cp, model_kwargs)

    def init_weights(self):
        """Load ``Pretrained`` init_cfgs strictly ourselves (mmengine's PretrainedInit loads with strict=False and
        would silently skip keys); the trunk initialised itself at construction, so nothing is re-initialised."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        others = []
        for cfg in cfgs:
            if cfg.get("type") == "Pretrained":
                self.load_checkpoint(cfg["checkpoint"], prefix=cfg.get("prefix"),
                                     map_location=cfg.get("map_location", "cpu"))
            else:
                others.append(cfg)
        if others:
            from mmengine.model import initialize
            initialize(self, others)
        self._is_init = True

    def train(self, mode: bool = True):
        super().train(mode)
        self._apply_train_mode(mode)
        return self

    def forward(self, x):
        return self._forward_features(x)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MetaFormerZooLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise lr decay for detectors / segmentors with a ``MetaFormerZooBackbone``.

    ``paramwise_cfg=dict(layer_decay_rate=0.9)``: the backbone's layers come from its ``group_matcher`` (stem = 0,
    then downsample/blocks in order, ``L`` layers); a parameter of layer ``i`` gets ``lr * rate ** (L - i)``; neck,
    heads and the adapter's output norms get ``lr``. Weight decay is 0 for 1-D parameters (norms, biases, scales)
    and the backbone's ``no_weight_decay()`` names (positional tables, SSM parameters ...), ``weight_decay``
    otherwise. Other ``paramwise_cfg`` keys are not used by this constructor.
    """

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        rate = float(self.paramwise_cfg.get("layer_decay_rate", 0.9))
        base_wd = self.base_wd or 0.0
        module = getattr(module, "module", module)  # unwrap (MM)DistributedDataParallel
        adapters = [(n, m) for n, m in module.named_modules() if isinstance(m, DenseBackboneMixin)]
        if not adapters:
            raise ValueError("MetaFormerZooLayerDecayOptimizerConstructor needs a model with a MetaFormerZooBackbone")
        prefix_name, adapter = adapters[0]
        trunk_prefix = f"{prefix_name}.model." if prefix_name else "model."
        ids, num_layers = layer_id_map(adapter.model)
        nwd = set(adapter.model.no_weight_decay()) if hasattr(adapter.model, "no_weight_decay") else set()
        groups: Dict[str, dict] = {}
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith(trunk_prefix):
                rel = name[len(trunk_prefix):]
                lid = ids[rel]
                no_decay = p.ndim == 1 or rel in nwd or rel.endswith(".bias")
            else:
                lid = num_layers
                no_decay = p.ndim == 1 or name.endswith(".bias")
            key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
            if key not in groups:
                groups[key] = dict(params=[], param_names=[], lr=self.base_lr * rate ** (num_layers - lid),
                                   weight_decay=0.0 if no_decay else base_wd, lr_scale=rate ** (num_layers - lid))
            groups[key]["params"].append(p)
            groups[key]["param_names"].append(name)
        for key in sorted(groups, key=lambda k: (int(k.split("_")[1]), k)):
            g = groups[key]
            g.pop("param_names")
            params.append(g)

# Mask R-CNN + FPN, 1x schedule (12 epochs, steps 8/11, 500-iter linear warmup), COCO, 2 images/GPU x 8 GPUs, with a
# metaformer_zoo backbone. Per-model files (configs/mmdet/mask-rcnn_<model>_fpn_1x_coco.py) set the model name, the
# FPN in_channels (= stage dims) and the paper's optimizer / drop path. Defaults here: the AdamW recipe of Swin /
# ConvNeXt / VMamba (lr 1e-4, wd 0.05, no decay on norms), used by families without an official detection recipe.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
# the backbone entry every zoo task base shares; imported after _base_, so mmengine still reads a plain config
from metaformer_zoo.dense.mm import zoo_backbone_cfg  # noqa: E402
custom_imports = dict(imports=['metaformer_zoo.dense'], allow_failed_imports=False)

model = dict(backbone=zoo_backbone_cfg(), neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))

# Semantic FPN, ADE20K 512x512, 40k iterations (PoolFormer / PVT recipe: 8 GPUs x 4 images, AdamW lr 2e-4, wd 1e-4,
# poly power 0.9 down to 0), with a metaformer_zoo backbone. Per-model files (configs/mmseg/fpn_<model>_...) set the
# model name, neck in_channels and the paper's schedule where it differs.
_base_ = ['mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py']
# the backbone entry every zoo task base shares; imported after _base_, so mmengine still reads a plain config
from metaformer_zoo.dense.mm import zoo_backbone_cfg  # noqa: E402
custom_imports = dict(imports=['metaformer_zoo.dense'], allow_failed_imports=False)

model = dict(
    pretrained=None,  # the base's open-mmlab://resnet50_v1c must not reach the zoo backbone
    backbone=zoo_backbone_cfg(),
    neck=dict(in_channels=[64, 128, 320, 512], out_channels=256, num_outs=4),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=None)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000))

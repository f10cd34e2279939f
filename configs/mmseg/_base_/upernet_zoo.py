# UperNet, ADE20K 512x512, 160k iterations, 16 images (4 GPUs x 4 here as in the packaged base; Swin / ConvNeXt /
# VMamba used 8 x 2), AdamW lr 6e-5, wd 0.01, 1500-iter linear warmup then poly (power 1.0) to 0: the Swin recipe
# that the MambaOut / ViM2 / iFormer papers follow. Auxiliary FCN head on stage 3. Per-model files set the model name
# and channels.
_base_ = ['mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py']
# the backbone entry every zoo task base shares; imported after _base_, so mmengine still reads a plain config
from metaformer_zoo.dense.mm import zoo_backbone_cfg  # noqa: E402
custom_imports = dict(imports=['metaformer_zoo.dense'], allow_failed_imports=False)

model = dict(
    pretrained=None,  # the base's open-mmlab://resnet50_v1c must not reach the zoo backbone
    backbone=zoo_backbone_cfg(),
    decode_head=dict(in_channels=[64, 128, 320, 512], num_classes=150),
    auxiliary_head=dict(in_channels=320, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

# RetinaNet + FPN (start_level=1, extra convs on input, 5 levels), 1x schedule, COCO, 2 images/GPU x 8 GPUs, with a
# metaformer_zoo backbone. The stride-4 map is returned but unused by FPN (start_level=1); as in the official
# PoolFormer (FORK_LAST3) / TransXNet (start_level=1) code its output norm is Identity (out_norm_skip=(0,)).
# Defaults: AdamW lr 1e-4, wd 1e-4 (PoolFormer / TransXNet / RaftMLP RetinaNet recipe).
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']
# the backbone entry every zoo task base shares; imported after _base_, so mmengine still reads a plain config
from metaformer_zoo.dense.mm import zoo_backbone_cfg  # noqa: E402
custom_imports = dict(imports=['metaformer_zoo.dense'], allow_failed_imports=False)

model = dict(
    backbone=zoo_backbone_cfg(out_norm_skip=(0, )),
    neck=dict(in_channels=[64, 128, 320, 512], start_level=1, add_extra_convs='on_input', num_outs=5))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4))

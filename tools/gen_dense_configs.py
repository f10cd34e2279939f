#!/usr/bin/env python
"""Write the per-model mmdet / mmseg configs (configs/mmdet/*.py, configs/mmseg/*.py) from one table.

Each generated file is short: it inherits a shared task base (configs/<fw>/_base_/<task>_zoo.py, which inherits the
packaged OpenMMLab base) and sets the backbone name, channels, drop path and the paper's optimizer where the paper
or its official code gives one. Edit the tables below and re-run: ``python tools/gen_dense_configs.py``.
This script needs neither mm packages nor the models (channels are listed here; tests check them against the
built models).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# family -> (source note, {variant: (dims, drop_path)}, {task: variants}, {task: (recipe overrides, recipe note)})
GENERIC_DET = "no official detection recipe: Swin / ConvNeXt / VMamba AdamW recipe of the base"
GENERIC_SEG = "no official Semantic FPN recipe: PoolFormer / PVT recipe of the base"
GENERIC_UPER = "no official UperNet recipe: Swin recipe of the base"
ALL = ("mask_rcnn", "retinanet", "fpn", "upernet")

POOL_S = (64, 128, 320, 512)
POOL_M = (96, 192, 384, 768)

FAMILIES = {
    "poolformer": dict(
        variants={"poolformer_s12": (POOL_S, 0.0), "poolformer_s24": (POOL_S, 0.0), "poolformer_s36": (POOL_S, 0.0),
                  "poolformer_m36": (POOL_M, 0.0), "poolformer_m48": (POOL_M, 0.0)},
        tasks={"mask_rcnn": ["poolformer_s12", "poolformer_s24", "poolformer_s36"],
               "retinanet": ["poolformer_s12", "poolformer_s24", "poolformer_s36"],
               "fpn": ["poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"],
               "upernet": ["poolformer_s12"]},
        dp_note="official fork_feat backbones use the default drop_path_rate=0",
        recipes={
            "mask_rcnn": (dict(optimizer=dict(lr=2e-4, weight_decay=1e-4), paramwise_cfg=dict(_delete_=True)),
                          "official (sail-sg/poolformer detection): AdamW lr 2e-4, wd 1e-4"),
            "retinanet": ({}, "official (sail-sg/poolformer detection): AdamW lr 1e-4, wd 1e-4, FORK_LAST3 norm0=Identity"),
            "fpn": ({}, "official (sail-sg/poolformer segmentation): AdamW lr 2e-4, wd 1e-4, poly 0.9, 40k iters"),
            "upernet": ({}, GENERIC_UPER),
        }),
    "poolformerv2": dict(variants={"poolformerv2_s12": (POOL_S, 0.1)}, dp_note="ImageNet-1k drop path"),
    "convformer": dict(variants={"convformer_s18": (POOL_S, 0.2)}, dp_note="ImageNet-1k drop path"),
    "caformer": dict(variants={"caformer_s18": (POOL_S, 0.15)}, dp_note="ImageNet-1k drop path"),
    "mambaout": dict(variants={"mambaout_tiny": ((96, 192, 384, 576), 0.2)}, dp_note="ImageNet-1k drop path"),
    "identityformer": dict(variants={"identityformer_s12": (POOL_S, 0.1)}, dp_note="ImageNet-1k drop path"),
    "randformer": dict(variants={"randformer_s12": (POOL_S, 0.1)}, dp_note="ImageNet-1k drop path",
                       model_kwargs=dict(random_mixing_resize=True)),
    "iformer": dict(variants={"iformer_small": ((96, 192, 320, 384), 0.2)}, dp_note="ImageNet-1k drop path"),
    "transxnet": dict(
        variants={"transxnet_t": ((48, 96, 224, 448), 0.1)},
        dp_note="official detection configs (T 0.1)",
        recipes={
            "mask_rcnn": (dict(optimizer=dict(lr=1e-4, weight_decay=0.05),
                               paramwise_cfg=dict(_delete_=True, custom_keys=dict(norm=dict(decay_mult=0.0)))),
                          "official (LMMMEng/TransXNet detection): AdamW lr 1e-4, wd 0.05, decay_mult 0 on 'norm' keys"),
            "retinanet": ({}, "official (LMMMEng/TransXNet detection): AdamW lr 1e-4, wd 1e-4, start_level=1"),
            "fpn": ("transxnet_fpn", "official (LMMMEng/TransXNet segmentation): AdamW lr 2e-4, wd 1e-4, cosine, "
                                     "1000-iter warmup, 80k iters"),
            "upernet": ({}, GENERIC_UPER),
        }),
    "affnet": dict(variants={"affnet": ((64, 128, 256, 320), 0.0)}, dp_note="ImageNet recipe has no drop path"),
    "raftmlp": dict(
        variants={"raftmlp_s": ((64, 128, 256, 512), 0.1)}, dp_note="zoo choice (official configs: none given)",
        recipes={
            "mask_rcnn": (dict(optimizer=dict(lr=1e-4, weight_decay=1e-4), paramwise_cfg=dict(_delete_=True)),
                          "official (okojoalg/raft-mlp detection): AdamW lr 1e-4, wd 1e-4"),
            "retinanet": ({}, "official (okojoalg/raft-mlp detection): AdamW lr 1e-4, wd 1e-4"),
            "fpn": ({}, "official (okojoalg/raft-mlp segmentation): AdamW lr 2e-4, wd 1e-4, poly, 40k iters"),
            "upernet": ({}, GENERIC_UPER),
        }),
    "msmlp": dict(variants={"msmlp_tiny": ((96, 192, 384, 768), 0.2)}, dp_note="ImageNet-1k drop path"),
    "stripmlp": dict(variants={"stripmlp_light_t": ((80, 160, 320, 640), 0.1)}, dp_note="zoo choice"),
    "vim2": dict(variants={"vim2_tiny": ((96, 192, 384, 768), 0.2)},
                 dp_note="VMamba-T value (the paper follows VMamba)",
                 recipes={"mask_rcnn": ({}, "paper: mmdetection 'following VMamba', AdamW lr 1e-4 (wd 0.05 VMamba)"),
                          "retinanet": ({}, "no RetinaNet in the paper: base recipe"),
                          "fpn": ({}, GENERIC_SEG),
                          "upernet": ({}, "paper: UperNet 512x512, AdamW lr 6e-5, batch 16; 160k as VMamba")}),
}

TASKS = {
    "mask_rcnn": ("mmdet", "mask-rcnn_{m}_fpn_1x_coco.py", "mask_rcnn_zoo.py", GENERIC_DET),
    "retinanet": ("mmdet", "retinanet_{m}_fpn_1x_coco.py", "retinanet_zoo.py",
                  "no official RetinaNet recipe: AdamW lr 1e-4, wd 1e-4 of the base"),
    "fpn": ("mmseg", "fpn_{m}_8xb4-40k_ade20k-512x512.py", "fpn_zoo.py", GENERIC_SEG),
    "upernet": ("mmseg", "upernet_{m}_4xb4-160k_ade20k-512x512.py", "upernet_zoo.py", GENERIC_UPER),
}

SPECIAL = {
    "transxnet_fpn": """optim_wrapper = dict(optimizer=dict(lr=2e-4, weight_decay=1e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1000),
    dict(type='CosineAnnealingLR', eta_min=0.0, T_max=79000, begin=1000, end=80000, by_epoch=False),
]
train_cfg = dict(max_iters=80000, val_interval=8000)
""",
}


def fmt(obj) -> str:
    """Python literal in the style of the configs (dict(...))."""
    if isinstance(obj, dict):
        return "dict(" + ", ".join(f"{k}={fmt(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(fmt(v) for v in obj)
        return f"[{inner}]" if isinstance(obj, list) else f"({inner}{',' if len(obj) == 1 else ''})"
    return repr(obj)


def render(family: str, spec: dict, task: str, model: str) -> str:
    fw, _, base, generic = TASKS[task]
    dims, dp = spec["variants"][model]
    recipe, note = spec.get("recipes", {}).get(task, ({}, generic))
    backbone = dict(model_name=model, drop_path_rate=dp)
    if spec.get("model_kwargs"):
        backbone["model_kwargs"] = spec["model_kwargs"]
    if task in ("mask_rcnn", "retinanet", "fpn"):
        model_cfg = dict(backbone=backbone, neck=dict(in_channels=list(dims)))
    else:
        model_cfg = dict(backbone=backbone, decode_head=dict(in_channels=list(dims)),
                         auxiliary_head=dict(in_channels=dims[2]))
    lines = [
        f"# {task.replace('_', ' ')}: {model} ({family}). Generated by tools/gen_dense_configs.py; edit the table there.",
        f"# Recipe: {note}.",
        f"# Drop path {dp}: {spec.get('dp_note', '')}.",
        f"_base_ = ['./_base_/{base}']",
        f"model = {fmt(model_cfg)}",
    ]
    if isinstance(recipe, str):
        lines.append(SPECIAL[recipe].rstrip())
    elif recipe:
        lines.append(f"optim_wrapper = {fmt(recipe)}")
    return "\n".join(lines) + "\n"


def main() -> int:
    written = []
    for family, spec in FAMILIES.items():
        tasks = spec.get("tasks") or {t: list(spec["variants"]) for t in ALL}
        for task in ALL:
            for model in tasks.get(task, []):
                fw, pattern, _, _ = TASKS[task]
                path = os.path.join(ROOT, "configs", fw, pattern.format(m=model))
                with open(path, "w") as f:
                    f.write(render(family, spec, task, model))
                written.append(os.path.relpath(path, ROOT))
    print(f"wrote {len(written)} configs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

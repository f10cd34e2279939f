#!/usr/bin/env python
"""Write the per-model mmdet / mmseg configs (configs/mmdet/*.py, configs/mmseg/*.py) from the family specs.

Each generated file is short: it inherits a shared task base (configs/<fw>/_base_/<task>_zoo.py, which inherits the
packaged OpenMMLab base) and sets the backbone name, channels, drop path and the paper's optimizer where the paper
or its official code gives one. The family set is the catalogue's (``metaformer_zoo.list_families()``), channels are
read from each model's ``feature_info`` (built on the meta device: no weights, no mm packages). ``DENSE`` below holds
only what a spec does not say: which variants get which task configs, the dense drop path and the official dense
recipes. A family without an entry gets its first variant for every task, drop path 0.1 and the generic recipes.
Re-run after adding a family or editing the table: ``python tools/gen_dense_configs.py`` (``--check``: exit 1 if a
config on disk differs from what would be written).
"""
import argparse
import os
import sys

import timm

import metaformer_zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# family -> variants (name -> drop path), dp_note, tasks ({task: variants}), recipes ({task: (overrides, note)}),
# model_kwargs. A task without a recipe gets the base's generic one (TASKS: GENERIC_*).
GENERIC_DET = "no official detection recipe: Swin / ConvNeXt / VMamba AdamW recipe of the base"
GENERIC_SEG = "no official Semantic FPN recipe: PoolFormer / PVT recipe of the base"
GENERIC_UPER = "no official UperNet recipe: Swin recipe of the base"
ALL = ("mask_rcnn", "retinanet", "fpn", "upernet")
IN1K_DP = "ImageNet-1k drop path"


def one_variant(model: str, drop_path: float, dp_note: str = IN1K_DP, **entry) -> dict:
    """The table entry of a family whose configs (every task) use one variant, ``model`` with ``drop_path``."""
    return dict(variants={model: drop_path}, dp_note=dp_note, **entry)


def adamw(lr: float, weight_decay: float, **paramwise) -> dict:
    """Optimizer overrides of an official recipe: AdamW ``lr`` / ``weight_decay``, and the base's paramwise_cfg
    (no decay on norms) replaced by ``paramwise`` (none given: plain decay everywhere)."""
    return dict(optimizer=dict(lr=lr, weight_decay=weight_decay), paramwise_cfg=dict(_delete_=True, **paramwise))


DENSE = {
    "poolformer": dict(
        variants={"poolformer_s12": 0.0, "poolformer_s24": 0.0, "poolformer_s36": 0.0,
                  "poolformer_m36": 0.0, "poolformer_m48": 0.0},
        tasks={"mask_rcnn": ["poolformer_s12", "poolformer_s24", "poolformer_s36"],
               "retinanet": ["poolformer_s12", "poolformer_s24", "poolformer_s36"],
               "fpn": ["poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"],
               "upernet": ["poolformer_s12"]},
        dp_note="official fork_feat backbones use the default drop_path_rate=0",
        recipes={
            "mask_rcnn": (adamw(2e-4, 1e-4), "official (sail-sg/poolformer detection): AdamW lr 2e-4, wd 1e-4"),
            "retinanet": ({}, "official (sail-sg/poolformer detection): AdamW lr 1e-4, wd 1e-4, FORK_LAST3 norm0=Identity"),
            "fpn": ({}, "official (sail-sg/poolformer segmentation): AdamW lr 2e-4, wd 1e-4, poly 0.9, 40k iters"),
        }),
    "poolformerv2": one_variant("poolformerv2_s12", 0.1),
    "convformer": one_variant("convformer_s18", 0.2),
    "caformer": one_variant("caformer_s18", 0.15),
    "mambaout": one_variant("mambaout_tiny", 0.2),
    "identityformer": one_variant("identityformer_s12", 0.1),
    "randformer": one_variant("randformer_s12", 0.1, model_kwargs=dict(random_mixing_resize=True)),
    "iformer": one_variant("iformer_small", 0.2),
    "transxnet": one_variant(
        "transxnet_t", 0.1, "official detection configs (T 0.1)",
        recipes={
            "mask_rcnn": (adamw(1e-4, 0.05, custom_keys=dict(norm=dict(decay_mult=0.0))),
                          "official (LMMMEng/TransXNet detection): AdamW lr 1e-4, wd 0.05, decay_mult 0 on 'norm' keys"),
            "retinanet": ({}, "official (LMMMEng/TransXNet detection): AdamW lr 1e-4, wd 1e-4, start_level=1"),
            "fpn": ("transxnet_fpn", "official (LMMMEng/TransXNet segmentation): AdamW lr 2e-4, wd 1e-4, cosine, "
                                     "1000-iter warmup, 80k iters"),
        }),
    "affnet": one_variant("affnet", 0.0, "ImageNet recipe has no drop path"),
    "raftmlp": one_variant(
        "raftmlp_s", 0.1, "zoo choice (official configs: none given)",
        recipes={
            "mask_rcnn": (adamw(1e-4, 1e-4), "official (okojoalg/raft-mlp detection): AdamW lr 1e-4, wd 1e-4"),
            "retinanet": ({}, "official (okojoalg/raft-mlp detection): AdamW lr 1e-4, wd 1e-4"),
            "fpn": ({}, "official (okojoalg/raft-mlp segmentation): AdamW lr 2e-4, wd 1e-4, poly, 40k iters"),
        }),
    "msmlp": one_variant("msmlp_tiny", 0.2),
    "stripmlp": one_variant("stripmlp_light_t", 0.1, "zoo choice"),
    "vim2": one_variant(
        "vim2_tiny", 0.2, "VMamba-T value (the paper follows VMamba)",
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


DEFAULT = dict(dp=0.1, dp_note="zoo default (no family entry in tools/gen_dense_configs.py)")


def dense_table(family) -> dict:
    """The generator's entry for a catalogued family: ``DENSE``'s, or the default (first variant, every task)."""
    entry = DENSE.get(family.name)
    if entry is None:
        entry = one_variant(family.variants[0], DEFAULT["dp"], DEFAULT["dp_note"])
    return entry


def channels(model: str) -> tuple:
    """Output channels of the 4 stages, from the model itself (meta device: nothing allocated)."""
    return tuple(int(f["num_chs"]) for f in timm.create_model(model, device="meta").feature_info)


def render(family: str, spec: dict, task: str, model: str) -> str:
    fw, _, base, generic = TASKS[task]
    dims, dp = channels(model), spec["variants"][model]
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


def generate() -> dict:
    """{path relative to the repository: config text} for every catalogued family (``composed`` has none)."""
    unknown = set(DENSE) - {f.name for f in metaformer_zoo.list_families()}
    if unknown:
        raise SystemExit(f"gen_dense_configs: DENSE names families the catalogue does not have: {sorted(unknown)}")
    out = {}
    for fam in metaformer_zoo.list_families():
        if fam.name == "composed":
            continue
        spec = dense_table(fam)
        tasks = spec.get("tasks") or {t: list(spec["variants"]) for t in ALL}
        for task in ALL:
            for model in tasks.get(task, []):
                fw, pattern, _, _ = TASKS[task]
                out[os.path.join("configs", fw, pattern.format(m=model))] = render(fam.name, spec, task, model)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a config on disk differs")
    args = parser.parse_args(argv)
    configs = generate()
    if args.check:
        stale = [p for p, text in configs.items()
                 if not os.path.isfile(os.path.join(ROOT, p)) or open(os.path.join(ROOT, p)).read() != text]
        for p in stale:
            print(f"stale or missing: {p}")
        print(f"{len(configs) - len(stale)} of {len(configs)} configs up to date")
        return 1 if stale else 0
    for p, text in configs.items():
        with open(os.path.join(ROOT, p), "w") as f:
            f.write(text)
    print(f"wrote {len(configs)} configs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Build every mmdet / mmseg config of the zoo and print its parameter counts.

    python tools/dense_params.py                    # all configs whose backbone is registered
    python tools/dense_params.py -k poolformer,vim2 # only configs whose file name contains one of these
    python tools/dense_params.py --markdown         # a Markdown table (model_cards/dense.md)

Needs the mm stack (``bash tools/install_mm.sh``). Counts are of the built detector / segmentor (80 COCO or 150
ADE20K classes, as in the configs), with the backbone (trunk + output norms) shown separately. ``paper`` is the
parameter count published by the family (official code measured or README / paper), where one exists.
"""
import argparse
import glob
import os
import re
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (task, model) -> (params, source). PoolFormer: official code built with mmdet 3.3 / mmseg 1.2 (reference
# metaformer.md 7.1, exact); others rounded as published.
PAPER = {
    ("retinanet", "poolformer_s12"): ("21.65M", "official code, measured"),
    ("retinanet", "poolformer_s24"): ("31.13M", "official code, measured"),
    ("retinanet", "poolformer_s36"): ("40.60M", "official code, measured"),
    ("mask-rcnn", "poolformer_s12"): ("31.57M", "official code, measured"),
    ("mask-rcnn", "poolformer_s24"): ("41.04M", "official code, measured"),
    ("mask-rcnn", "poolformer_s36"): ("50.52M", "official code, measured"),
    ("fpn", "poolformer_s12"): ("15.67M", "official code, measured"),
    ("fpn", "poolformer_s24"): ("25.14M", "official code, measured"),
    ("fpn", "poolformer_s36"): ("34.62M", "official code, measured"),
    ("fpn", "poolformer_m36"): ("59.78M", "official code, measured"),
    ("fpn", "poolformer_m48"): ("77.08M", "official code, measured"),
    ("mask-rcnn", "iformer_small"): ("40M", "iFormer README"),
    ("fpn", "iformer_small"): ("24M", "iFormer README"),
    ("upernet", "iformer_small"): ("49M", "iFormer README"),
    ("mask-rcnn", "vim2_tiny"): ("39M", "ViM2 paper"),
    ("upernet", "vim2_tiny"): ("51M", "ViM2 paper"),
}


def task_of(path):
    base = os.path.basename(path)
    return "mask-rcnn" if base.startswith("mask-rcnn") else base.split("_")[0]


def build(path):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    fw = "mmdet" if os.sep + "mmdet" + os.sep in path else "mmseg"
    if fw == "mmdet":
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(path)
    with DefaultScope.overwrite_default_scope(fw):
        return cfg, MODELS.build(cfg.model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", "--filter", default="", help="comma-separated substrings of the config file name")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    try:
        import mmcv.ops  # noqa: F401
        import mmdet  # noqa: F401
        import mmseg  # noqa: F401
    except ImportError as e:
        sys.exit(f"dense_params.py needs mmcv (with ops), mmdet and mmseg: run `bash tools/install_mm.sh` ({e})")
    import timm
    import metaformer_zoo  # noqa: F401
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "mmdet", "*.py"))
                   + glob.glob(os.path.join(ROOT, "configs", "mmseg", "*.py")))
    keys = [k for k in args.filter.split(",") if k] or [""]
    paths = [p for p in paths if any(k in os.path.basename(p) for k in keys)]
    rows = []
    t0 = time.time()
    for p in paths:
        name = re.search(r"model_name='([^']+)'", open(p).read()).group(1)
        task = task_of(p)
        if not timm.is_model(name):
            rows.append((task, name, None, None, None, os.path.basename(p)))
            continue
        _, model = build(p)
        total = sum(x.numel() for x in model.parameters())
        bb = sum(x.numel() for x in model.backbone.parameters())
        rows.append((task, name, total, bb, PAPER.get((task, name), ("", ""))[0], os.path.basename(p)))
        print(f"[{time.time() - t0:6.1f}s] {os.path.basename(p)}: {total:,}", file=sys.stderr)
        del model
    if args.markdown:
        print("| backbone | task | params (zoo) | backbone params (zoo) | paper / official | config |")
        print("|---|---|---|---|---|---|")
        for task, name, total, bb, paper, cfg in rows:
            if total is None:
                print(f"| {name} | {task} | (not registered here) | | {paper or ''} | `{cfg}` |")
            else:
                print(f"| {name} | {task} | {total / 1e6:.2f}M ({total:,}) | {bb:,} | {paper or '-'} | `{cfg}` |")
    else:
        print(f"{'backbone':20s} {'task':10s} {'params':>14s} {'backbone':>14s} {'paper':>8s}")
        for task, name, total, bb, paper, cfg in rows:
            if total is None:
                print(f"{name:20s} {task:10s} {'not registered':>14s}")
            else:
                print(f"{name:20s} {task:10s} {total:>14,} {bb:>14,} {paper or '-':>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

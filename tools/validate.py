#!/usr/bin/env python3
"""Evaluate a zoo model: a tools/train.py checkpoint, a weights file, a local Hub folder, or pretrained weights.

    python tools/validate.py --checkpoint output/digits/model_best.pth.tar            # model and data from the run
    python tools/validate.py --checkpoint output/run/last.pth.tar --use-ema           # its EMA weights (--model-ema)
    python tools/validate.py --model identityformer_s12 --pretrained --data-dir /data/imagenet --split validation
    python tools/validate.py --model local-dir:converted/identityformer_s12 --pretrained --data-dir /data/imagenet

Uses timm's create_dataset / create_loader / resolve_data_config (the model's eval transform: crop_pct,
interpolation, mean/std) and prints top-1 / top-5 and a one-row table.
"""
import argparse
import json
import os
import sys
import time

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_REPO, os.path.join(_REPO, "tools")):  # tools/ too: imported from its file (not run), `train` resolves
    if _p not in sys.path:
        sys.path.insert(0, _p)

import timm  # noqa: E402
from timm.data import create_dataset, create_loader, resolve_data_config  # noqa: E402
from timm.utils import ParseKwargs, accuracy  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metaformer_zoo  # noqa: E402,F401
from metaformer_zoo.checkpoint import (  # noqa: E402
    CheckpointError, load_checkpoint_file, unwrap_state_dict, validate_state_dict)
from metaformer_zoo.data import EVAL_SPLITS, find_split, prepare_digits  # noqa: E402
from train import HelpFormatter, model_kwarg  # noqa: E402  (tools/train.py, next to this file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default="", help="tools/train.py checkpoint or a weights file")
    p.add_argument("--model", default=None, help="model name; None: the checkpoint's")
    p.add_argument("--model-kwargs", nargs="*", type=model_kwarg, action=ParseKwargs, default=None,
                   metavar="KEY=VALUE", help="create_model kwargs (Python literals), over the checkpoint's")
    p.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights")
    p.add_argument("--use-ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--data-dir", default=None, help="ImageFolder root holding the --split class folders; None: the "
                                                   "checkpoint's, or the bundled digits")
    p.add_argument("--split", default="validation", help="split folder under --data-dir (val/ or eval/ are used "
                                                        "when it is absent)")
    p.add_argument("--num-classes", type=int, default=None, help="classes; None: the checkpoint's, or the number "
                                                                 "of class folders in the split")
    p.add_argument("--img-size", type=int, default=None, help="input side; None: the run's, or the model's")
    p.add_argument("--crop-pct", type=float, default=None, help="center-crop fraction; None: the run's or model's")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="batch size")
    p.add_argument("-j", "--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda / cpu")
    p.add_argument("--results-file", default="", help="also write the results as JSON here")
    return p


def write_results(path: str, result):
    """``--results-file``: write ``result`` there as JSON when a path is given; returns ``result``."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)

    train_args, state, weights = {}, None, "pretrained" if args.pretrained else "initial"
    if args.use_ema and not args.checkpoint:
        p.error("--use-ema needs --checkpoint (a tools/train.py checkpoint of a run with --model-ema)")
    if args.checkpoint:
        try:
            ckpt = load_checkpoint_file(args.checkpoint)
        except CheckpointError as e:
            p.error(f"--checkpoint: {e}")
        train_args = ckpt.get("args", {}) if isinstance(ckpt.get("args"), dict) else {}
        if args.use_ema:
            if "state_dict_ema" not in ckpt:
                p.error(f"--use-ema: {args.checkpoint} has no EMA weights (no 'state_dict_ema'; its run was trained "
                        f"without --model-ema). Drop --use-ema to evaluate its plain weights, or give a checkpoint "
                        f"of a run trained with --model-ema.")
            weights, state = "state_dict_ema", ckpt["state_dict_ema"]
        elif "state_dict" in ckpt:
            weights, state = "state_dict", ckpt["state_dict"]
        else:
            try:
                weights, state = "weights file", unwrap_state_dict(ckpt)
            except CheckpointError as e:
                p.error(f"--checkpoint {args.checkpoint}: {e}")
    name = args.model or train_args.get("model")
    if not name:
        p.error("give --model (the checkpoint does not record one)")
    data_dir = args.data_dir or train_args.get("data_dir")
    if data_dir is None:
        data_dir = prepare_digits(size=train_args.get("digits_size", 64))
    try:
        args.split = find_split(data_dir, args.split, EVAL_SPLITS)
    except ValueError as e:
        p.error(f"--data-dir: {e}")
    split_dir = os.path.join(data_dir, args.split)
    num_classes = args.num_classes or train_args.get("num_classes") or (
        len([d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))])
        if state is not None else None)
    kwargs = dict(train_args.get("model_kwargs") or {})
    kwargs.update(args.model_kwargs or {})
    if num_classes:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=args.pretrained, **kwargs)
    if state is not None:
        try:
            validate_state_dict(state, model, source=args.checkpoint)
        except CheckpointError as e:
            raise SystemExit(f"--checkpoint: {e}") from e
        model.load_state_dict(state)
    data_config = resolve_data_config(
        dict(img_size=args.img_size or train_args.get("img_size"), crop_pct=args.crop_pct or train_args.get("crop_pct")),
        model=model)
    device = torch.device(args.device)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    ds = create_dataset("", root=data_dir, split=args.split, is_training=False)
    loader = create_loader(ds, input_size=data_config["input_size"], batch_size=args.batch_size,
                           interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
                           crop_pct=data_config["crop_pct"], num_workers=args.workers, device=device,
                           use_prefetcher=False, persistent_workers=False)
    c1 = c5 = n = 0
    t0 = time.time()
    with torch.no_grad():
        for x, y in tqdm(loader, desc=f"validate {name}", file=sys.stderr, leave=False):
            x, y = x.to(device), y.to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=args.amp, dtype=torch.bfloat16):
                out = model(x)
            a1, a5 = accuracy(out.float(), y, topk=(1, min(5, out.shape[-1])))
            c1 += a1.item() * x.shape[0] / 100
            c5 += a5.item() * x.shape[0] / 100
            n += x.shape[0]
    res = dict(model=name, weights=weights, top1=round(100 * c1 / n, 3), top5=round(100 * c5 / n, 3), images=n,
               img_size=data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
               seconds=round(time.time() - t0, 1))
    print("| model | weights | top1 | top5 | images | img_size | crop_pct |\n|---|---|---|---|---|---|---|")
    print(f"| {name} | {weights} | {res['top1']:.2f} | {res['top5']:.2f} | {n} | {res['img_size']} "
          f"| {res['crop_pct']} |")
    return write_results(args.results_file, res)


if __name__ == "__main__":
    main()

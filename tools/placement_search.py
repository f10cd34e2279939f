#!/usr/bin/env python3
"""Placement search for a mixer supernet (``zoo_supernet``): accuracy, speed and MACs of each placement, Pareto front.

::

    python tools/train.py --recipe supernet_digits                      # one supernet, trained once
    python tools/placement_search.py --checkpoint output/supernet_digits/model_best.pth.tar \\
        --plot pareto.png --write-presets hub/supernet_digits

For every candidate placement (``--space``: the model's presets, every per-stage assignment, or random per-block
ones; at most ``--max-placements``) it measures top-1 on the validation split, throughput on this machine
(``torch.utils.benchmark``, images/s at ``--bench-batch``, same process for every placement, so the ratios compare)
and MACs (``FlopCounterMode`` FLOPs / 2). It prints every placement and the Pareto front (no other placement is both
more accurate and faster) as tables, plots accuracy vs throughput (``--plot``, matplotlib) and writes a Hub folder
(``--write-presets DIR``: ``config.json`` + ``model.safetensors``) whose presets are the front's fastest (``fast``),
most accurate (``accurate``) and the fastest within ``--balanced-drop`` points of the best (``balanced``), loadable
with ``timm.create_model("local-dir:DIR", pretrained=True)`` (``model.presets``).
"""
import argparse
import itertools
import json
import os
import random
import sys
from typing import Dict, List, Sequence, Tuple

import torch
import torch.utils.benchmark as benchmark

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import timm  # noqa: E402
from timm.data import create_dataset, create_loader, resolve_data_config  # noqa: E402

import metaformer_zoo  # noqa: E402,F401
from metaformer_zoo.checkpoint import CheckpointError, load_checkpoint_file, validate_state_dict  # noqa: E402
from metaformer_zoo.data import EVAL_SPLITS, find_split, prepare_digits  # noqa: E402
from metaformer_zoo.hub import export_folder  # noqa: E402
from metaformer_zoo.zoo import count_macs  # noqa: E402
from validate import write_results  # noqa: E402  (tools/validate.py, next to this file)


TRAIN_DATA_KEYS = ("model", "data_dir", "digits_size", "img_size", "crop_pct")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a tools/train.py checkpoint of a supernet (its args name the model)")
    src.add_argument("--hub-dir", help="a Hub folder (config.json + model.safetensors) of a supernet")
    p.add_argument("--data-dir", default=None, help="ImageFolder root; None: the checkpoint's, else the digits")
    p.add_argument("--split", default="validation", help="evaluation split (validation / val / test)")
    p.add_argument("--img-size", type=int, default=None, help="input side; None: the checkpoint's / model's")
    p.add_argument("--space", default="stages", choices=("presets", "stages", "random"),
                   help="placements to try: the presets; every one-mixer-per-stage assignment; random per-block "
                        "(the presets, smallest and largest are always included)")
    p.add_argument("--max-placements", type=int, default=32, help="at most this many placements (random subset)")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    p.add_argument("--bench-batch", type=int, default=128, help="batch size of the throughput measurement")
    p.add_argument("--bench-time", type=float, default=0.3, help="seconds of timing per placement and round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds over all placements, interleaved (best "
                   "round kept: robust to a busy machine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while timing; None: torch's default")
    p.add_argument("--seed", type=int, default=0, help="seed of the random placements / subset")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-throughput plot here (PNG)")
    p.add_argument("--write-presets", default=None, metavar="DIR",
                   help="write a Hub folder with the chosen presets (fast / balanced / accurate) to DIR")
    p.add_argument("--balanced-drop", type=float, default=1.0,
                   help="'balanced': the fastest front placement within this many top-1 points of the best")
    p.add_argument("--results-file", default=None, help="write every placement's numbers here (JSON)")
    return p


def load_supernet(args, p) -> Tuple[torch.nn.Module, Dict, Dict]:
    """(model, model_args for a Hub folder, train args) from ``--checkpoint`` or ``--hub-dir``."""
    if args.hub_dir:
        cfg_path = os.path.join(args.hub_dir, "config.json")
        if not os.path.isfile(cfg_path):
            p.error(f"--hub-dir {args.hub_dir} has no config.json; give a folder written by save_for_hf / "
                    f"tools/convert.py / --write-presets")
        with open(cfg_path) as f:
            config = json.load(f)
        model = timm.create_model(f"local-dir:{args.hub_dir}", pretrained=True)
        model_args = dict(config.get("model_args", {}))
        # the data settings the folder's supernet was trained with (written by --write-presets)
        train_args = dict(config.get("metaformer_zoo", {}).get("train_data", {}))
        train_args.setdefault("img_size", model_args.get("img_size"))
    else:
        try:
            ckpt = load_checkpoint_file(args.checkpoint)
        except CheckpointError as e:
            p.error(f"--checkpoint: {e}")
        train_args = ckpt.get("args", {}) if isinstance(ckpt.get("args"), dict) else {}
        if "state_dict" not in ckpt or not train_args.get("model"):
            p.error(f"--checkpoint {args.checkpoint} is not a tools/train.py checkpoint (no 'state_dict' / 'args'); "
                    f"give a Hub folder with --hub-dir instead")
        model_args = dict(train_args.get("model_kwargs") or {})
        state = ckpt["state_dict"]
        model_args["num_classes"] = state["head.fc.weight"].shape[0] if "head.fc.weight" in state else \
            train_args.get("num_classes") or 1000
        if train_args.get("img_size"):
            model_args.setdefault("img_size", train_args["img_size"])
        model = timm.create_model(train_args["model"], **model_args)
        try:
            validate_state_dict(state, model, source=args.checkpoint)
        except CheckpointError as e:
            raise SystemExit(f"--checkpoint: {e}") from e
        model.load_state_dict(state)
    if not hasattr(model, "set_placement"):
        p.error(f"{type(model).__name__} is not a mixer supernet (no set_placement); train a zoo_supernet")
    return model.eval(), model_args, train_args


def candidate_placements(model, space: str, limit: int, seed: int) -> List[Tuple[str, Tuple]]:
    """(label, placement) pairs: the presets, the smallest and the largest first, then the ``space``."""
    out: Dict[Tuple, str] = {}
    for name, pl in model.presets.items():
        out.setdefault(pl, name)
    out.setdefault(model.smallest_placement(), "smallest")
    out.setdefault(model.largest_placement(), "largest")
    rest: List[Tuple] = []
    if space == "stages":
        for combo in itertools.product(*model.stage_mixers):
            rest.append(model.normalize_placement(list(combo)))
    elif space == "random":
        gen = torch.Generator().manual_seed(seed)
        rest = model.sample_placements(max(limit, 1), generator=gen)[2:]
    rest = [r for r in dict.fromkeys(rest) if r not in out]
    random.Random(seed).shuffle(rest)
    for r in rest[:max(0, limit - len(out))]:
        out[r] = "-"
    return [(label, pl) for pl, label in out.items()]


def short(placement: Sequence[Sequence[str]]) -> str:
    """``pool/sepc/attn+sepc/attn``: stages joined by '/', differing blocks of a stage by '+'."""
    parts = []
    for s in placement:
        names = [n[:4] for n in s]
        parts.append(names[0] if len(set(names)) == 1 else "+".join(names))
    return "/".join(parts)


def load_eval_data(args, model, train_args, p) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    data_dir = args.data_dir or train_args.get("data_dir")
    if data_dir is None or not os.path.isdir(data_dir):
        data_dir = prepare_digits(size=train_args.get("digits_size", 64))
    try:
        split = find_split(data_dir, args.split, EVAL_SPLITS)
    except ValueError as e:
        p.error(f"--data-dir: {e}")
    cfg = resolve_data_config(dict(img_size=args.img_size or train_args.get("img_size"),
                                   crop_pct=train_args.get("crop_pct")), model=model)
    ds = create_dataset("", root=data_dir, split=split, is_training=False)
    loader = create_loader(ds, input_size=cfg["input_size"], batch_size=args.batch_size,
                           interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                           crop_pct=cfg["crop_pct"], num_workers=0, use_prefetcher=False)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


@torch.no_grad()
def top1(model, xs, ys) -> float:
    correct = n = 0
    for x, y in zip(xs, ys):
        correct += (model(x).argmax(-1) == y).sum().item()
        n += y.numel()
    return 100.0 * correct / n


def throughput(model, x: torch.Tensor, min_time: float) -> float:
    """Images per second (median of ``torch.utils.benchmark`` blocks)."""
    with torch.no_grad():
        model(x)  # warm up
        m = benchmark.Timer(stmt="model(x)", globals=dict(model=model, x=x)).blocked_autorange(min_run_time=min_time)
    return x.shape[0] / m.median


def pareto_front(rows: List[Dict]) -> List[Dict]:
    """Rows no other row beats on both top-1 and throughput (ties kept), fastest first."""
    front = [r for r in rows if not any(
        o["top1"] >= r["top1"] and o["img_s"] >= r["img_s"] and (o["top1"] > r["top1"] or o["img_s"] > r["img_s"])
        for o in rows)]
    return sorted(front, key=lambda r: -r["img_s"])


def choose_presets(front: List[Dict], drop: float) -> Dict[str, Tuple]:
    best = max(front, key=lambda r: r["top1"])
    fast = max(front, key=lambda r: r["img_s"])
    balanced = max((r for r in front if r["top1"] >= best["top1"] - drop), key=lambda r: r["img_s"])
    return dict(fast=fast["placement"], balanced=balanced["placement"], accurate=best["placement"])


def print_table(rows: List[Dict], title: str):
    print(f"\n{title}\n| placement | label | top1 | img/s | MMACs |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {short(r['placement'])} | {r['label']} | {r['top1']:.2f} | {r['img_s']:.1f} | {r['macs'] / 1e6:.2f} |")


def plot(rows: List[Dict], front: List[Dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["img_s"] for r in rows], [r["top1"] for r in rows], c="0.6", s=18, label="placements")
    ax.plot([r["img_s"] for r in front], [r["top1"] for r in front], "o-", c="C3", label="Pareto front")
    for r in rows:
        if r["label"] != "-":
            ax.annotate(r["label"], (r["img_s"], r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("throughput (images / s, this machine)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("zoo_supernet placements: accuracy vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, model_args, train_args = load_supernet(args, p)
    xs, ys = load_eval_data(args, model, train_args, p)
    input_size = tuple(xs[0].shape[1:])
    bench_x = torch.cat(xs)[:args.bench_batch]
    rows = []
    for label, pl in candidate_placements(model, args.space, args.max_placements, args.seed):
        model.set_placement(pl)
        rows.append(dict(label=label, placement=pl, top1=top1(model, xs, ys), img_s=0.0,
                         macs=count_macs(model, input_size)))
        print(f"{short(pl):40s} {label:10s} top1 {rows[-1]['top1']:6.2f}", file=sys.stderr)
    for _ in range(max(1, args.rounds)):  # interleaved rounds: load changes hit every placement alike
        for r in rows:
            model.set_placement(r["placement"])
            r["img_s"] = max(r["img_s"], throughput(model, bench_x, args.bench_time))
    front = pareto_front(rows)
    print_table(sorted(rows, key=lambda r: -r["img_s"]), f"every placement ({len(rows)}), fastest first")
    print_table(front, "Pareto front (no placement is both more accurate and faster)")
    chosen = choose_presets(front, args.balanced_drop)
    print("\nchosen presets: " + ", ".join(f"{k} = {short(v)}" for k, v in chosen.items()))
    if args.plot:
        plot(rows, front, args.plot)
        print(f"plot: {args.plot}")
    if args.write_presets:
        model.presets = chosen
        model.set_placement("accurate")
        name = train_args.get("model") or model.pretrained_cfg.get("architecture", "zoo_supernet")
        model_args = {k: v for k, v in model_args.items() if k != "num_classes"}  # export_folder sets it
        model_args["presets"] = {k: [list(s) for s in v] for k, v in chosen.items()}
        export_folder(model, args.write_presets, model_name=name, model_args=model_args,
                      extra_info=dict(train_data={k: train_args[k] for k in TRAIN_DATA_KEYS if k in train_args},
                                      placement_search=[dict(placement=[list(s) for s in r["placement"]],
                                                             top1=r["top1"], img_s=r["img_s"], macs=r["macs"])
                                                        for r in front]))
        print(f"presets written to {args.write_presets} (timm.create_model('local-dir:{args.write_presets}', "
              f"pretrained=True).presets)")
    return write_results(args.results_file, dict(rows=rows, front=front, presets=chosen))


if __name__ == "__main__":
    main()

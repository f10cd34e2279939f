#!/usr/bin/env python
"""Draw what token mixers do: each mixer's token-mixing matrix (metaformer_zoo.analysis.mixing_matrix) as heatmaps.

    python tools/mixing_matrix.py caformer_s18 --stage 2 --block 0 --out caformer.png
    python tools/mixing_matrix.py convformer_s18 caformer_s18 --stage 2 --out compare.png     # models side by side
    python tools/mixing_matrix.py zoo_metaformer --mixers pooling,sepconv,attention,random --size 7 --out mixers.png
    python tools/mixing_matrix.py randformer_s12 --checkpoint output/run/model_best.pth.tar --out trained.png

One column per model (or, with ``--mixers``, per mixer: a ``zoo_metaformer`` with the first model's depths and dims
and that mixer in every stage). Top row: the receptive weights of the query token (``--query row,col``, default the
centre) on the H x W grid, i.e. row ``query`` of the matrix; bottom row: the full L x L matrix M[i, j] =
mean_c d y[c, i] / d x[c, j] (i: output token, j: input token, row-major), in a diverging colour map centred on 0
whose range is the largest off-diagonal weight (a larger self weight saturates; the title then says so).
``--cross-channel`` adds the cross-channel RMS. The input is a seeded random image (the matrix of data-dependent
mixers depends on it); models are randomly initialised unless ``--checkpoint`` (a tools/train.py checkpoint, a
timm / zoo weights file, or an official checkpoint of a zoo family) is given.

``--size N`` chooses the token grid of the analysed stage (the image is N * stride pixels); default: the model's
default input size. ``--channels K`` averages the Jacobian over K evenly spaced channels (0: all; exact but
K x slower). Needs matplotlib: ``pip install 'metaformer-zoo[plot]'``.
"""
import argparse
import os
import sys
import textwrap
import time
from typing import Dict, List, Optional, Sequence, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.utils import ParseKwargs  # noqa: E402

import metaformer_zoo  # noqa: E402,F401  (registers the zoo models and mixers)
from metaformer_zoo.analysis import MixingResult, mixing_analysis, receptive_field  # noqa: E402
from metaformer_zoo.checkpoint import (  # noqa: E402
    CheckpointError, load_checkpoint_file, unwrap_state_dict, validate_state_dict)
from metaformer_zoo.hub import convert_checkpoint  # noqa: E402
from metaformer_zoo.mixers import list_mixers  # noqa: E402

try:  # optional: figures (`pip install 'metaformer-zoo[plot]'`)
    import matplotlib
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - reported by main
    matplotlib = Figure = None

MATPLOTLIB_MISSING = ("tools/mixing_matrix.py draws with matplotlib, which is not installed: "
                      "pip install 'metaformer-zoo[plot]' (or pip install matplotlib)")


def pair(text: str) -> Tuple[int, int]:
    """argparse ``type`` of ``--query``: ``row,col``."""
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected row,col (e.g. 7,7), got {text!r}") from None
    return r, c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="timm / zoo model name(s), one column each")
    p.add_argument("--stage", type=int, default=2, help="stage index, 0-based (default 2: stride 16)")
    p.add_argument("--block", type=int, default=0, help="block index within the stage (default 0)")
    p.add_argument("--path", default=None, help="a sub-module path instead of --stage/--block (e.g. stages.2.blocks.0"
                                                " for a whole block)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--mixers", default=None,
                   help=f"comma-separated mixer names: one zoo_metaformer per mixer, with the first MODEL's depths and "
                        f"dims (registered: {', '.join(list_mixers())})")
    p.add_argument("--size", type=int, default=None, help="token grid side at the stage (default: the model's "
                                                          "default input size)")
    p.add_argument("--query", type=pair, default=None, help="query token row,col (default: the centre)")
    p.add_argument("--checkpoint", default=None, help="weights for the (single) MODEL")
    p.add_argument("--channels", type=int, default=16, help="channels averaged over (default 16; 0 = all)")
    p.add_argument("--cross-channel", action="store_true", help="add a row with the cross-channel RMS")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the input image")
    p.add_argument("--model-kwargs", nargs="*", action=ParseKwargs, default={}, metavar="K=V",
                   help="create_model kwargs, values as Python literals (timm ParseKwargs)")
    p.add_argument("--title", default=None, help="figure title (default: what is drawn, and 'random init')")
    p.add_argument("--dpi", type=int, default=100)
    return p


def load_weights(model: nn.Module, name: str, path: str, kwargs: Dict) -> nn.Module:
    """``model`` with the weights of ``path``: zoo / timm layout (train checkpoints too), else the family's official
    format; a CheckpointError (nothing loaded) when neither fits."""
    ckpt = load_checkpoint_file(path)
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else unwrap_state_dict(ckpt)
    try:
        validate_state_dict(state, model, source=path)
    except CheckpointError as zoo_error:
        try:
            return convert_checkpoint(name, ckpt, **kwargs)
        except (CheckpointError, ValueError) as official_error:
            raise CheckpointError(f"{zoo_error}\n  As an official checkpoint: {official_error}") from None
    model.load_state_dict(state)
    return model


def checkpoint_kwargs(path: str) -> Dict:
    """create_model kwargs a tools/train.py checkpoint records (num_classes, model_kwargs)."""
    ckpt = load_checkpoint_file(path)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    kw = dict(args.get("model_kwargs") or {})
    if args.get("num_classes"):
        kw["num_classes"] = args["num_classes"]
    return kw


def stage_stride(model: nn.Module, stage: int) -> int:
    info = list(getattr(model, "feature_info", None) or [])
    if not 0 <= stage < len(info):
        raise SystemExit(f"error: {type(model).__name__} has {len(info)} stages, --stage {stage} is not one of them")
    return int(info[stage]["reduction"])


def default_img_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def template_args(model: nn.Module) -> Dict:
    """depths and dims of a staged model, for the --mixers zoo_metaformers."""
    depths = tuple(len(s.blocks) for s in model.stages)
    dims = tuple(int(f["num_chs"]) for f in model.feature_info)
    return dict(depths=depths, dims=dims)


def build_columns(args) -> List[Tuple[str, nn.Module, int]]:
    """(label, model, image size) per column."""
    kwargs = dict(args.model_kwargs)
    if args.checkpoint:
        if len(args.models) > 1 or args.mixers:
            raise SystemExit("error: --checkpoint loads one model: give a single MODEL and no --mixers")
        try:
            kwargs = dict(checkpoint_kwargs(args.checkpoint), **kwargs)
        except CheckpointError as e:
            raise SystemExit(f"error: --checkpoint: {e}") from None
    columns = []
    for name in args.models:
        if not timm.is_model(name.split(".")[0]):
            raise SystemExit(f"error: unknown model {name!r} (see `python -m metaformer_zoo list` / timm.list_models)")
    if args.mixers:
        names = [m.strip() for m in args.mixers.split(",") if m.strip()]
        unknown = [m for m in names if m.lower() not in list_mixers()]
        if unknown:
            raise SystemExit(f"error: unknown mixer(s) {', '.join(unknown)}; registered: {', '.join(list_mixers())}")
        torch.manual_seed(args.seed)
        template = timm.create_model(args.models[0], **kwargs)
        stride = stage_stride(template, args.stage)
        size = (args.size * stride) if args.size else default_img_size(template)
        for mixer in names:
            torch.manual_seed(args.seed)
            model = timm.create_model("zoo_metaformer", token_mixers=mixer, img_size=size, **template_args(template))
            columns.append((mixer, model, size))
        return columns
    for name in args.models:
        torch.manual_seed(args.seed)
        model = timm.create_model(name, **kwargs)
        if args.checkpoint:
            try:
                model = load_weights(model, name, args.checkpoint, kwargs)
            except CheckpointError as e:
                raise SystemExit(f"error: --checkpoint: {e}") from None
        stride = stage_stride(model, args.stage) if args.path is None else 1
        size = (args.size * stride) if args.size else default_img_size(model)
        columns.append((name, model, size))
    return columns


def analyse(columns, args) -> List[Tuple[str, MixingResult, float]]:
    out = []
    for label, model, size in columns:
        gen = torch.Generator().manual_seed(args.seed)
        img = torch.randn(1, model.in_chans if hasattr(model, "in_chans") else 3, size, size, generator=gen)
        where = dict(path=args.path) if args.path else dict(stage=args.stage, block=args.block)
        t0 = time.perf_counter()
        try:
            res = mixing_analysis(model, img, channels=args.channels or None, **where)
        except (ValueError, IndexError) as e:
            raise SystemExit(f"error: {label}: {e}") from None
        out.append((label, res, time.perf_counter() - t0))
    return out


def plot(results: Sequence[Tuple[str, MixingResult, float]], out: str, query: Optional[Tuple[int, int]],
         cross: bool, title: str, dpi: int = 100) -> None:
    if Figure is None:
        raise SystemExit(f"error: {MATPLOTLIB_MISSING}")
    n, rows = len(results), 3 if cross else 2
    width = max(3.3 * n, 4.6)
    fig = Figure(figsize=(width, 3.1 * rows + 0.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, n, squeeze=False)
    for col, (label, res, _) in enumerate(results):
        H, W = res.grid
        q = query if query is not None else (H // 2, W // 2)
        try:
            field = receptive_field(res.matrix, res.grid, q).cpu().numpy()
        except ValueError as e:
            raise SystemExit(f"error: --query: {e}") from None
        matrix = res.matrix.cpu()
        # colours span the off-diagonal weights: a residual-like self weight (pooling's 1/9 - 1, AFFNet's inner
        # skip) would otherwise wash out the mixing; the diagonal then saturates, and the title says so
        off = (matrix - torch.diag(matrix.diagonal())).abs().max().item()
        lim = off or matrix.abs().max().item() or 1.0
        clipped = " (diagonal clipped)" if matrix.diagonal().abs().max().item() > lim * 1.001 else ""
        panels = [(field, f"{label}\n{res.mixer} @ {res.path}\nquery {q[0]},{q[1]} on {H}x{W}{clipped}"),
                  (matrix.numpy(), f"M [{H * W}x{H * W}]: out token i, in token j")]
        if cross:
            panels.append((res.cross_channel.cpu().numpy(), "cross-channel RMS"))
        for row, (data, text) in enumerate(panels):
            ax = axes[row][col]
            if row == len(panels) - 1 and cross:
                im = ax.imshow(data, cmap="magma", vmin=0)
            else:
                im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            if row == 0:
                ax.plot([q[1]], [q[0]], marker="+", color="black", markersize=9, mew=1.5)
            ax.set_title(text, fontsize=8)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.suptitle(textwrap.fill(title, int(width * 13)), fontsize=9)
    fig.savefig(out, dpi=dpi)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if Figure is None:
        raise SystemExit(f"error: {MATPLOTLIB_MISSING}")
    results = analyse(build_columns(args), args)
    for label, res, secs in results:
        L = res.matrix.shape[0]
        print(f"{label:24s} {res.path:36s} {res.mixer:22s} grid {res.grid[0]}x{res.grid[1]} ({L} tokens), "
              f"{len(res.channels)} channels, row sum {res.matrix.sum(1).mean().item():+.3f}, "
              f"diag {res.matrix.diagonal().mean().item():+.3f}, cross-channel RMS "
              f"{res.cross_channel.mean().item():.2e}, {secs:.1f}s")
    where = args.path or f"stage {args.stage} block {args.block}"
    title = args.title or (f"token-mixing matrices ({where}; "
                           f"{'checkpoint weights' if args.checkpoint else 'random init'}, random input)")
    plot(results, args.out, args.query, args.cross_channel, title, args.dpi)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

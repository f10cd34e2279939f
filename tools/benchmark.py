#!/usr/bin/env python
"""Benchmark zoo models: params, MACs, inference throughput, training step time, peak memory; table, CSV and plot.

    python tools/benchmark.py --models identityformer_s12 caformer_s18 --batch-size 32
    python tools/benchmark.py --family randformer --device cuda --amp --plot randformer.png
    python tools/benchmark.py --all --no-train --img-size 224 --csv zoo.csv --plot zoo.png
    python tools/benchmark.py --all --no-infer --no-train --plot zoo_macs.png      # top-1 vs MACs, no timing

Models: ``--models`` (zoo or timm names), ``--family`` (catalogue family, repeatable) or ``--all`` (every catalogue
variant); ``--model-kwargs key=value ...`` go to ``timm.create_model`` (timm's ``ParseKwargs``). Fixed-size models
(e.g. RandFormer) always run at their own size. MACs are FlopCounterMode FLOPs / 2 at the benchmark resolution
(matmul / conv / SDPA; the reference tables' rule).

Timing: ``--num-warmup`` untimed calls, then the median time per call over ``--min-run-time`` seconds of timed calls:
``torch.utils.benchmark.Timer.blocked_autorange`` on CPU, ``triton.testing.do_bench`` (CUDA events) on GPU. Peak
memory: CUDA ``max_memory_allocated``, or on CPU the peak resident-set growth sampled during the run.

Side by side (``--compare NAME`` or ``--official FILE.py:FUNC``): every selected model is timed against a reference
in the same process, alternating which one runs first in each of ``--rounds`` rounds (median of the rounds), and the
table gains ``ref``, ``ref_*_ms`` and ``*_speedup`` = reference time / model time (> 1: the model is faster).
``--compare`` takes any timm / zoo name (e.g. ``--models vim2_tiny --compare caformer_s18``); ``--official`` takes a
function ``FUNC(name, model) -> nn.Module`` in a file or module of yours that builds the official implementation
with the zoo model's weights (e.g. through the family's ``zoo.family_of(name).official`` converter), run from
wherever the official code lives:

    python tools/benchmark.py --models raftmlp_s --official ~/scratch/official_raftmlp.py:build --threads 2

``--plot`` (needs matplotlib: ``pip install 'metaformer-zoo[plot]'``) draws the published ImageNet-1k top-1
(``model_cards/results.csv``) against inference throughput, or against MACs when nothing was timed
(``--plot-x``); marker area = params, hollow markers = paper-only numbers. Families without a published top-1 are
named on stdout, not silently dropped.
"""
import argparse
import csv
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils import ParseKwargs  # noqa: E402

from metaformer_zoo import zoo  # noqa: E402
from metaformer_zoo.cli import model_kwarg  # noqa: E402
from metaformer_zoo.hub import official_results  # noqa: E402
from metaformer_zoo.kernels import measure_ms  # noqa: E402  (the zoo's one timer)

try:  # optional: figures (`pip install 'metaformer-zoo[plot]'`)
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
except ImportError:  # pragma: no cover - reported by --plot
    matplotlib = Figure = Line2D = None

COLUMNS = ("model", "family", "params_m", "gmacs", "img_size", "batch", "infer_img_s", "infer_ms", "train_img_s",
           "train_ms", "peak_mem_mb", "top1", "top1_source", "device", "ref", "ref_infer_ms", "ref_train_ms",
           "infer_speedup", "train_speedup")
REF_COLUMNS = ("ref", "ref_infer_ms", "ref_train_ms", "infer_speedup", "train_speedup")
TABLE_COLUMNS = tuple(c for c in COLUMNS if c not in ("top1_source", "device"))
PLOT_X = ("auto", "throughput", "gmacs")
MATPLOTLIB_MISSING = ("--plot needs matplotlib, which is not installed: pip install 'metaformer-zoo[plot]' "
                      "(or pip install matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = p.add_argument_group("models")
    sel.add_argument("--models", nargs="+", default=None, help="model names")
    sel.add_argument("--family", action="append", default=None, help="catalogue family (repeatable)")
    sel.add_argument("--all", action="store_true", help="every catalogue variant")
    sel.add_argument("--owner", choices=("zoo", "timm"), default=None, help="with --all: only zoo / timm-owned")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", "-b", type=int, default=None, help="default 64 on GPU, 8 on CPU")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: each model's cfg size)")
    p.add_argument("--num-warmup", type=int, default=1, help="untimed calls before each measurement (default 1)")
    p.add_argument("--min-run-time", type=float, default=1.0,
                   help="seconds of timed calls per measurement; the median per call is reported (default 1)")
    p.add_argument("--no-infer", action="store_true", help="skip the inference benchmark")
    p.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--channels-last", action="store_true")
    ref = p.add_argument_group("side by side (one process, alternating order, median of rounds)")
    side = ref.add_mutually_exclusive_group()
    side.add_argument("--compare", default=None, metavar="NAME",
                      help="time every model against this timm / zoo model (e.g. caformer_s18)")
    side.add_argument("--official", default=None, metavar="FILE.py:FUNC",
                      help="time every model against FUNC(name, model) -> nn.Module (or module:FUNC): your builder "
                           "of the official implementation with the zoo model's weights")
    ref.add_argument("--rounds", type=int, default=6, help="alternating rounds of a side-by-side timing (default 6)")
    p.add_argument("--model-kwargs", nargs="*", type=model_kwarg, action=ParseKwargs, default={}, metavar="K=V",
                   help="extra create_model kwargs, values as Python literals (timm ParseKwargs)")
    p.add_argument("--results", default=None,
                   help="CSV of top-1 numbers (model,top1,source) to use instead of the published ones the family "
                        "specs declare (model_cards/results.csv lists those)")
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--plot", default=None, help="write a PNG: published top-1 vs throughput or MACs (matplotlib)")
    p.add_argument("--plot-x", choices=PLOT_X, default="auto",
                   help="x axis: throughput (measured img/s), gmacs, or auto (throughput if timed, else gmacs)")
    p.add_argument("--plot-size", default="1500x950", help="WIDTHxHEIGHT of the plot in pixels (150 dpi)")
    p.add_argument("--no-progress", action="store_true")
    return p


def select_models(args) -> List[str]:
    names = list(args.models or [])
    for fam in args.family or ():
        names += zoo.list_variants(fam)
    if args.all:
        names += zoo.list_variants(owner=args.owner)
    names = list(dict.fromkeys(names))
    if not names:
        raise SystemExit("error: no models selected (use --models, --family or --all)")
    unknown = [n for n in names if not timm.models.is_model(n.split(".")[0])]
    if unknown:
        raise SystemExit(f"error: unknown model(s): {', '.join(unknown)}")
    return names


class _RssSampler:
    """Peak resident-set growth of this process over a block (Linux /proc; falls back to ru_maxrss deltas)."""

    def __init__(self, interval=0.002):
        self.interval = interval
        self.peak = self.base = 0
        self._stop = threading.Event()

    @staticmethod
    def rss():
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    @staticmethod
    def release_free_memory():
        """Hand freed heap pages back to the OS (glibc ``malloc_trim``) so the next RSS baseline is not inflated by
        memory that earlier models freed but the allocator kept (their reuse would otherwise hide real growth)."""
        import gc
        gc.collect()
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def __enter__(self):
        self.release_free_memory()
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self):
        return max(self.peak - self.base, 0) / 2 ** 20


def load_factory(spec: str) -> Callable:
    """``--official``: ``path/to/file.py:FUNC`` or ``package.module:FUNC`` -> FUNC. The file's folder goes first on
    ``sys.path`` so official code can import its siblings."""
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise SystemExit(f"error: --official wants FILE.py:FUNC or module:FUNC, got {spec!r}")
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(os.path.expanduser(target))
        if not os.path.isfile(path):
            raise SystemExit(f"error: --official: no such file: {target}")
        sys.path.insert(0, os.path.dirname(path))
        mspec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise SystemExit(f"error: --official: cannot import {target!r}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise SystemExit(f"error: --official: {target} has no function {func!r}")
    return fn


def time_pair(a: Callable[[], object], b: Callable[[], object], device, warmup: int = 1, min_run_time: float = 1.0,
              rounds: int = 6) -> Tuple[float, float]:
    """Median ms per call of ``a`` and of ``b``, timed side by side: ``rounds`` rounds of ``measure_ms`` on each,
    the one timed first alternating (so neither always runs on a cold or a warm machine)."""
    for f in (a, b):
        for _ in range(warmup):
            f()
    ta, tb = [], []
    each = min_run_time / max(rounds, 1)
    for r in range(max(rounds, 1)):
        if r % 2 == 0:
            ta.append(measure_ms(a, device, 0, each))
            tb.append(measure_ms(b, device, 0, each))
        else:
            tb.append(measure_ms(b, device, 0, each))
            ta.append(measure_ms(a, device, 0, each))
    return statistics.median(ta), statistics.median(tb)


def _logits(out):
    """The tensor a train step's loss is taken of (official models may return tuples or dicts)."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _steps(model: torch.nn.Module, x: torch.Tensor, autocast):
    """(inference step, train step) closures of one model on input x (SGD, cross-entropy on the logits)."""
    def step_infer():
        with torch.no_grad(), autocast:
            model(x)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    target = torch.randint(0, max(getattr(model, "num_classes", 1000) or 1, 1), (x.shape[0],), device=x.device)

    def step_train():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = _logits(model(x))
            loss = (torch.nn.functional.cross_entropy(out, target % out.shape[1]) if out.dim() == 2
                    else out.float().mean())
        loss.backward()
        opt.step()

    return step_infer, step_train


def bench_model(name: str, device: torch.device, batch_size: int, img_size: Optional[int] = None, warmup: int = 1,
                min_run_time: float = 1.0, infer: bool = True, train: bool = True, amp: bool = False,
                channels_last: bool = False, model_kwargs: Optional[Dict] = None,
                top1: Optional[Tuple[float, str]] = None,
                reference: Optional[Tuple[str, Callable[[str, torch.nn.Module], torch.nn.Module]]] = None,
                rounds: int = 6) -> Dict:
    """One row of the benchmark table (dict with COLUMNS). ``top1`` is ``(top1, source)`` or None.

    Without ``infer`` and ``train`` nothing is timed and the model is only built on the meta device (params, MACs).
    ``reference = (label, build)``: ``build(name, model)`` returns the module to time side by side with the model
    (``time_pair``); the row then has ``ref``, ``ref_*_ms`` and ``*_speedup`` (reference time / model time).
    """
    try:
        family = zoo.family_of(name).name
    except ValueError:
        family = ""
    cfg = timm.models.get_pretrained_cfg(name).to_dict() if timm.models.get_pretrained_cfg(name) else {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    if img_size and not cfg.get("fixed_input_size"):
        size = (size[0], img_size, img_size)
    kwargs = dict(model_kwargs or {})
    meta = timm.create_model(name, device="meta", **kwargs)
    total, _ = zoo.count_params(meta)
    try:
        macs = zoo.count_macs(meta, size, device="meta")
    except Exception:  # noqa: BLE001 - ops without meta kernels: count on CPU
        macs = zoo.count_macs(timm.create_model(name, **kwargs), size)
    del meta
    row = dict(model=name, family=family, params_m=total / 1e6, gmacs=macs / 1e9, img_size=size[1], batch=batch_size,
               infer_img_s=None, infer_ms=None, train_img_s=None, train_ms=None, peak_mem_mb=None,
               top1=top1[0] if top1 else None, top1_source=top1[1] if top1 else None, device=str(device),
               **dict.fromkeys(REF_COLUMNS))
    if not (infer or train):
        row["batch"] = None
        return row
    model = timm.create_model(name, **kwargs).to(device)
    x = torch.randn(batch_size, *size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ref_model = None
    if reference is not None:
        ref_model = reference[1](name, model)
        if not isinstance(ref_model, torch.nn.Module):
            raise ValueError(f"the reference builder returned {type(ref_model).__name__}, not an nn.Module")
        ref_model = ref_model.to(device)
        if channels_last:
            ref_model = ref_model.to(memory_format=torch.channels_last)
        row["ref"] = reference[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sampler = _RssSampler() if device.type != "cuda" else None
    if sampler:
        sampler.__enter__()
    try:
        step_infer, step_train = _steps(model, x, autocast)
        ref_infer, ref_train = _steps(ref_model, x, autocast) if ref_model is not None else (None, None)
        for mode, step, ref_step, enabled in (("infer", step_infer, ref_infer, infer),
                                              ("train", step_train, ref_train, train)):
            if not enabled:
                continue
            for m in (model, ref_model):
                if m is not None:
                    m.train(mode == "train")
            wu = warmup if mode == "infer" else max(warmup, 1)
            if ref_step is None:
                ms = measure_ms(step, device, wu, min_run_time)
            else:
                ms, ref_ms = time_pair(step, ref_step, device, wu, 2 * min_run_time, rounds)
                row.update({f"ref_{mode}_ms": ref_ms, f"{mode}_speedup": ref_ms / ms})
            row.update({f"{mode}_ms": ms, f"{mode}_img_s": batch_size / (ms / 1e3)})
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
            peak = sampler.delta_mb
        else:
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    row["peak_mem_mb"] = peak
    del model, x, ref_model
    return row


def format_table(rows: Sequence[Dict]) -> str:
    def fmt(v, col):
        if v is None:
            return "-"
        if isinstance(v, float):
            if col in ("params_m", "gmacs"):
                return f"{v:.2f}" if col == "params_m" else f"{v:.3f}"
            if col.endswith("speedup"):
                return f"{v:.2f}"
            return f"{v:.1f}"
        return str(v)

    cols = [c for c in TABLE_COLUMNS if c not in REF_COLUMNS or any(r.get(c) is not None for r in rows)]
    table = [cols] + [[fmt(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _group(row: Dict) -> str:
    return row.get("family") or row["model"]


def _paper_only(row: Dict) -> bool:
    """The top-1 comes from the paper alone (results.csv source ``paper arXiv ...``), not an official README."""
    return (row.get("top1_source") or "").startswith("paper")


def plot_results(rows: Sequence[Dict], path: str, x: str = "auto", size: Tuple[int, int] = (1500, 950),
                 device: str = "cpu") -> Dict:
    """Published top-1 (y) vs inference throughput or MACs (x, log), marker area = params; writes a PNG.

    ``device`` describes the timing conditions in the x label (e.g. ``"cpu, torch threads 1"``).

    One colour and marker per family; hollow markers are paper-only numbers (source ``paper ...``). Returns
    ``dict(x=..., points=n, families=[drawn], paper_only=[models drawn hollow], without_top1=[family (models)],
    not_measured=[models])``: families in ``rows`` without any published top-1 and models with a top-1 but no value
    on the x axis are not drawn, and are returned (``main`` prints them) instead of being dropped silently.
    """
    if Figure is None:
        raise SystemExit(f"error: {MATPLOTLIB_MISSING}")
    if x not in PLOT_X:
        raise ValueError(f"x must be one of {PLOT_X}, got {x!r}")
    measured = [r for r in rows if r.get("infer_img_s") or r.get("train_img_s")]
    if x == "auto":
        x = "throughput" if measured else "gmacs"
    if x == "throughput":
        key = "infer_img_s" if any(r.get("infer_img_s") for r in rows) else "train_img_s"
    else:
        key = "gmacs"
    groups = list(dict.fromkeys(_group(r) for r in rows))
    with_top1 = [r for r in rows if r.get("top1") is not None]
    pts = [r for r in with_top1 if r.get(key)]
    drawn = list(dict.fromkeys(_group(r) for r in pts))
    without = [g for g in groups if not any(_group(r) == g for r in with_top1)]
    summary = dict(x=key, points=len(pts), families=drawn, paper_only=[r["model"] for r in pts if _paper_only(r)],
                   not_measured=[r["model"] for r in with_top1 if r not in pts],
                   without_top1=[f"{g} ({', '.join(r['model'] for r in rows if _group(r) == g)})" for g in without])
    if not pts:
        raise SystemExit(f"error: --plot has nothing to draw: no selected model has both a published top-1 "
                         f"({', '.join(summary['without_top1'])} have none) and a {key} value")

    width, height = size
    dpi = 150
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    colors = [c for cmap in ("tab10", "Dark2") for c in matplotlib.colormaps[cmap].colors]
    markers = "osD^vP*Xh<>p"
    pmax = max(r["params_m"] for r in pts)
    for i, g in enumerate(drawn):
        sel = [r for r in pts if _group(r) == g]
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        xs, ys = [r[key] for r in sel], [r["top1"] for r in sel]
        area = [30 + 270 * r["params_m"] / pmax for r in sel]
        paper = [_paper_only(r) for r in sel]
        for res in dict.fromkeys(r.get("img_size") for r in sel):  # one line per family and input size
            line = sorted((r[key], r["top1"]) for r in sel if r.get("img_size") == res)
            ax.plot(*zip(*line), color=color, lw=0.8, alpha=0.5, zorder=1)
        ax.scatter([v for v, p in zip(xs, paper) if not p], [v for v, p in zip(ys, paper) if not p],
                   s=[a for a, p in zip(area, paper) if not p], c=[color], marker=marker, alpha=0.75,
                   edgecolors="black", linewidths=0.4, zorder=2)
        ax.scatter([v for v, p in zip(xs, paper) if p], [v for v, p in zip(ys, paper) if p],
                   s=[a for a, p in zip(area, paper) if p], facecolors="none", edgecolors=[color], marker=marker,
                   linewidths=1.4, zorder=2)
        for r in sel:
            ax.annotate(r["model"], (r[key], r["top1"]), xytext=(4, 3), textcoords="offset points", fontsize=5.5,
                        color="0.25")
    handles = [Line2D([], [], color=colors[i % len(colors)], marker=markers[i % len(markers)], ls="", ms=7,
                      label=g) for i, g in enumerate(drawn)]
    if any(_paper_only(r) for r in pts):
        handles.append(Line2D([], [], color="0.3", marker="o", ls="", ms=7, mfc="none",
                              label="hollow: paper-only top-1"))
    if without:
        handles.append(Line2D([], [], color="0.5", marker="x", ls="", ms=6,
                              label="not drawn, no published top-1:\n" + "\n".join(without)))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              title="family", title_fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    xs_all = [r[key] for r in pts]
    if math.log10(max(xs_all) / min(xs_all)) < 2.5:  # few decades: label the 2x, 3x, 5x minor ticks as well
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""))
    else:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=6)
    if key == "gmacs":
        ax.set_xlabel("GMACs (FlopCounterMode FLOPs / 2 at the benchmark input size)")
        title = "ImageNet-1k top-1 vs MACs"
    else:
        what = "inference" if key == "infer_img_s" else "training"
        batch = pts[0].get("batch")
        ax.set_xlabel(f"{what} throughput, images/s ({device}, batch {batch})")
        title = f"ImageNet-1k top-1 vs {what} throughput"
    ax.set_ylabel("published ImageNet-1k top-1 (%)")
    ax.set_title(f"{title} (marker area = params, {min(r['params_m'] for r in pts):.3g}-{pmax:.3g} M)", fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    fig.savefig(path, dpi=dpi)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = build_parser().parse_args(argv)
    if args.plot and Figure is None:
        raise SystemExit(f"error: {MATPLOTLIB_MISSING}")
    try:
        plot_size = tuple(int(v) for v in args.plot_size.lower().split("x"))
        if len(plot_size) != 2 or min(plot_size) < 200:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: --plot-size must be WIDTHxHEIGHT in pixels (each >= 200), "
                         f"got {args.plot_size!r}") from None
    names = select_models(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    results = official_results(args.results)
    reference = None
    if args.compare:
        if not timm.models.is_model(args.compare.split(".")[0]):
            raise SystemExit(f"error: --compare: unknown model {args.compare!r}")
        reference = (args.compare, lambda name, model: timm.create_model(args.compare))
    elif args.official:
        reference = ("official", load_factory(args.official))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = names if (tqdm is None or args.no_progress) else tqdm(names, desc="benchmark", unit="model")
    rows = []
    for name in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(name)
        top1 = results.get(name)
        try:
            row = bench_model(name, device, batch, args.img_size, args.num_warmup, args.min_run_time,
                              infer=not args.no_infer, train=not args.no_train, amp=args.amp,
                              channels_last=args.channels_last, model_kwargs=args.model_kwargs, top1=top1,
                              reference=reference, rounds=args.rounds)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory, unsupported size: report and go on
            print(f"\n{name}: failed: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
            try:
                family = zoo.family_of(name).name
            except ValueError:
                family = ""
            row = dict(model=name, family=family, device=str(device), top1=top1[0] if top1 else None,
                       top1_source=top1[1] if top1 else None)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(format_table(rows))
    if reference is not None:
        print(f"*_speedup = {reference[0]} time / model time, side by side in this process ({args.rounds} "
              f"alternating rounds, medians): > 1 means the model is faster")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c) for c in COLUMNS})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        label = device.type + (f", torch threads {torch.get_num_threads()}" if device.type == "cpu" else "")
        summary = plot_results(rows, args.plot, args.plot_x, plot_size, device=label + (", bf16" if args.amp else ""))
        print(f"plot: {args.plot} ({summary['points']} models of {len(summary['families'])} families, "
              f"x = {summary['x']})")
        if summary["without_top1"]:
            print("no published top-1 (not drawn): " + "; ".join(summary["without_top1"]))
        if summary["not_measured"]:
            print(f"no {summary['x']} value (not drawn): " + ", ".join(summary["not_measured"]))
    return rows


if __name__ == "__main__":
    main()

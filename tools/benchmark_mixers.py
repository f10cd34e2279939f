#!/usr/bin/env python
"""Per-token-mixer micro-benchmark.

Two modes:

* **model mode** (default): for each model name (default: the smallest variant of every family in the zoo catalogue,
  zoo-owned and timm-owned, plus ``zoo_metaformer``), build the model, run one forward at batch 1 at its default resolution (``--img-size`` to
  override) with forward pre-hooks on every token mixer, and record the inputs each mixer sees. Token mixers are the
  modules whose class is registered in the mixer registry (``metaformer_zoo.mixers``) and modules stored under the
  attribute name ``token_mixer`` (timm's MetaFormer, the zoo skeleton); a match nested inside another match is not
  timed separately. Identical mixers (same class, configuration, parameter shapes and input shapes) are timed once
  and counted. Each distinct mixer is then timed alone at batch ``--batch``.
* **registry mode** (``--mixers NAME ... --shapes CxHxW ...``): build each registered mixer with
  ``metaformer_zoo.mixers.create_mixer(name, C, context=...)`` for each shape and time it on a (B, C, H, W) input.
  The skeleton context (``feat_size``, ``stage_idx``, ``block_idx``) is filled in from the shape; ``stage_idx``
  comes from ``--stage-idx`` or, by default, from the shape's stride relative to a 224 input (56 -> 0, 28 -> 1,
  14 -> 2, 7 -> 3).

Timing (``metaformer_zoo.kernels.measure_ms``, the zoo's one timer): ``--warmup`` untimed calls, then the median
time per call over ``--min-run-time`` seconds of timed calls (``torch.utils.benchmark.Timer.blocked_autorange`` on CPU,
``triton.testing.do_bench`` on GPU) of the forward (under ``torch.no_grad``) and, with ``--backward``, of forward +
backward (gradient w.r.t. the input and every parameter). Device: CUDA if available unless ``--device cpu``. On a
shared CPU host use ``--threads 1``: multi-threaded parallel regions stall behind other processes and the times
explode. ``--model-kwargs`` / ``--mixer-kwargs`` take ``key=value`` items (timm's ``ParseKwargs``, Python literals).

Examples::

    python tools/benchmark_mixers.py                                   # one model per family
    python tools/benchmark_mixers.py msmlp_tiny --batch 8 --min-run-time 2 --backward
    python tools/benchmark_mixers.py --mixers mixshift pooling --shapes 96x56x56 384x14x14 --batch 16
    python tools/benchmark_mixers.py zoo_metaformer --model-kwargs "token_mixers=['pooling','aff','ss2d','attention']"
"""
import argparse
import copy
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.utils import ParseKwargs  # noqa: E402

from metaformer_zoo.cli import model_kwarg  # noqa: E402
from metaformer_zoo.kernels import measure_ms  # noqa: E402  (the zoo's one timer)

__all__ = ["main", "find_mixers", "time_module", "default_models"]

_STAGE_RE = re.compile(r"(?:^|\.)(?:stages|layers|levels|stage|layer|level)[._]?(\d+)(?:\.|$)")


# ---------------------------------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------------------------------
def default_models(zoo_only: bool = False) -> List[str]:
    """The smallest registered variant (by parameter count) of every catalogued family, plus ``zoo_metaformer``.

    Catalogued families are those of ``metaformer_zoo.zoo.list_families()``: the zoo's own and, unless ``zoo_only``,
    the timm-owned MetaFormer families (PoolFormer, ConvFormer, CAFormer, MambaOut ...).
    """
    import timm
    from metaformer_zoo.zoo import count_params, list_families
    names = []
    for fam in list_families():
        if zoo_only and fam.owner != "zoo":
            continue
        variants = [v for v in fam.variants if timm.is_model(v)]
        if not variants:
            continue
        sizes = {}
        for v in variants:
            try:
                with torch.device("meta"):
                    sizes[v] = count_params(timm.create_model(v))[0]
            except Exception:  # noqa: BLE001 - a variant that cannot build on meta: rank it last
                sizes[v] = math.inf
        names.append(min(variants, key=lambda v: sizes[v]))
    if timm.is_model("zoo_metaformer"):
        names.append("zoo_metaformer")
    return names


def _mixer_classes() -> Tuple[type, ...]:
    from metaformer_zoo.mixers import get_mixer, list_mixers
    fns = [get_mixer(n) for n in list_mixers()]
    return tuple({f for f in fns if isinstance(f, type) and issubclass(f, nn.Module)})


def _is_mixer(name: str, module: nn.Module, classes: Tuple[type, ...]) -> bool:
    return isinstance(module, classes) or name.split(".")[-1] == "token_mixer"


def _stage_of(name: str) -> str:
    m = _STAGE_RE.search(name)
    return m.group(1) if m else "-"


def _shape_str(args: Sequence[Any]) -> str:
    parts = []
    for a in args:
        if torch.is_tensor(a):
            parts.append("x".join(str(s) for s in a.shape))
        elif a is not None:
            parts.append(repr(a))
    return ", ".join(parts)


def _signature(module: nn.Module, args, kwargs) -> Tuple:
    shapes = tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else repr(a) for a in args)
    kw = tuple(sorted((k, (tuple(v.shape), v.dtype) if torch.is_tensor(v) else repr(v)) for k, v in kwargs.items()))
    params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    try:
        extra = module.extra_repr()
    except Exception:  # noqa: BLE001
        extra = ""
    return type(module), extra, params, shapes, kw


def find_mixers(model: nn.Module, example: torch.Tensor) -> List[Dict[str, Any]]:
    """Run ``model(example)`` once with pre-hooks on every token mixer; return one record per distinct mixer.

    Each record: ``name`` (first module name), ``stage``, ``cls``, ``count``, ``module``, ``args``/``kwargs`` (the
    inputs seen, batch 1), ``shape`` (printable input shape).
    """
    classes = _mixer_classes()
    candidates = [(n, m) for n, m in model.named_modules() if n and _is_mixer(n, m, classes)]
    # keep outermost matches only
    names = [n for n, _ in candidates]
    outer = [(n, m) for n, m in candidates if not any(n.startswith(o + ".") for o in names if o != n)]
    seen: Dict[str, Tuple[tuple, dict]] = {}
    handles = []

    def make_hook(name):
        def hook(mod, args, kwargs):
            if name not in seen:  # first call only (weight-shared mixers may run more than once)
                cap = lambda a: a.detach().clone() if torch.is_tensor(a) else a  # noqa: E731
                seen[name] = (tuple(cap(a) for a in args), {k: cap(v) for k, v in kwargs.items()})
        return hook

    for n, m in outer:
        handles.append(m.register_forward_pre_hook(make_hook(n), with_kwargs=True))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()

    records: Dict[Tuple, Dict[str, Any]] = {}
    for n, m in outer:
        if n not in seen:
            continue  # not used in the forward (e.g. pruned)
        args, kwargs = seen[n]
        key = (_stage_of(n),) + _signature(m, args, kwargs)
        if key in records:
            records[key]["count"] += 1
            continue
        records[key] = dict(name=n, stage=_stage_of(n), cls=type(m).__name__, count=1, module=m, args=args,
                            kwargs=kwargs, shape=_shape_str(list(args) + list(kwargs.values())))
    return list(records.values())


# ---------------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------------
def _batched(value: Any, batch: int, dtype: Optional[torch.dtype], device: torch.device, grad: bool):
    """A batch-``batch`` version of a captured input: fresh random floats, other tensors repeated along dim 0."""
    if not torch.is_tensor(value):
        return value
    shape = list(value.shape)
    if value.is_floating_point():
        if shape and shape[0] == 1:
            shape[0] = batch
        t = torch.randn(shape, device=device, dtype=dtype or value.dtype)
        return t.requires_grad_(grad)
    if value.dim() and value.shape[0] == 1:
        value = value.expand(batch, *value.shape[1:]).contiguous()
    return value.to(device)


def time_module(module: nn.Module, args: Sequence[Any], kwargs: Dict[str, Any], batch: int, device: torch.device,
                dtype: Optional[torch.dtype] = None, warmup: int = 1, min_run_time: float = 0.5,
                backward: bool = False) -> Dict[str, float]:
    """Median milliseconds of ``module(*args, **kwargs)`` (forward) and, with ``backward``, forward + backward."""
    module = module.to(device)
    if dtype is not None:
        module = module.to(dtype)
    out: Dict[str, float] = {}

    def fwd_inputs(grad):
        a = [_batched(v, batch, dtype, device, grad) for v in args]
        k = {n: _batched(v, batch, dtype, device, grad) for n, v in kwargs.items()}
        return a, k

    module.eval()
    a, k = fwd_inputs(False)

    def forward():
        with torch.no_grad():
            module(*a, **k)

    out["fwd_ms"] = measure_ms(forward, device, warmup, min_run_time)

    if backward:
        module.train()
        ga, gk = fwd_inputs(True)
        leaves = [v for v in list(ga) + list(gk.values()) if torch.is_tensor(v) and v.requires_grad]

        def forward_backward():
            module.zero_grad(set_to_none=True)
            for v in leaves:
                v.grad = None
            y = module(*ga, **gk)
            y = y[0] if isinstance(y, (tuple, list)) else y
            y.backward(torch.ones_like(y))

        out["fwd_bwd_ms"] = measure_ms(forward_backward, device, warmup, min_run_time)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def _parse_shape(text: str) -> Tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be CxHxW, e.g. 64x56x56") from None
    return c, h, w


def _stage_from_size(h: int, w: int) -> int:
    stride = 224 / max(1, min(h, w))
    return int(min(3, max(0, round(math.log2(stride)) - 2)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="*", help="model names (default: the smallest variant of every catalogued family)")
    p.add_argument("--zoo-only", action="store_true", help="default models: zoo-owned families only (not timm's)")
    p.add_argument("--mixers", nargs="+", help="registry mode: registered mixer names (see --list-mixers)")
    p.add_argument("--shapes", nargs="+", type=_parse_shape, default=None,
                   help="registry mode: input shapes CxHxW (default 64x56x56 128x28x28 320x14x14 512x7x7)")
    p.add_argument("--mixer-kwargs", nargs="*", type=model_kwarg, action=ParseKwargs, default={}, metavar="K=V",
                   help="registry mode: kwargs for every mixer (key=value, Python literals)")
    p.add_argument("--stage-idx", type=int, default=None, help="registry mode: stage context (default: from H, W)")
    p.add_argument("--model-kwargs", nargs="*", type=model_kwarg, action=ParseKwargs, default={}, metavar="K=V",
                   help="model mode: create_model kwargs (key=value, Python literals)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="model mode: input H [W] (default: cfg)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the timed runs (default 8)")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="seconds of timed calls per measurement; the median per call is reported (default 0.5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="cast mixers and inputs (default: float32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    p.add_argument("--csv", default=None, help="also write the table as CSV to this path")
    p.add_argument("--list-mixers", action="store_true", help="print the registered mixers and exit")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")
    return p


def _print_table(rows: List[Dict[str, Any]], backward: bool, file=None):
    file = file or sys.stdout
    cols = ["model", "stage", "mixer", "count", "input", "fwd_ms"] + (["fwd_bwd_ms"] if backward else [])
    cells = [[str(r.get(c, "")) if not isinstance(r.get(c), float) else f"{r[c]:.3f}" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line, file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    import timm
    from tqdm import tqdm

    import metaformer_zoo  # noqa: F401  (registers models and mixers)
    from metaformer_zoo.mixers import create_mixer, list_mixers

    if args.list_mixers:
        print("\n".join(list_mixers()))
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype else None

    jobs = []  # (row, module, inputs, kwargs)
    if args.mixers:
        shapes = args.shapes or [(64, 56, 56), (128, 28, 28), (320, 14, 14), (512, 7, 7)]
        for name in args.mixers:
            for c, h, w in shapes:
                stage = args.stage_idx if args.stage_idx is not None else _stage_from_size(h, w)
                row = dict(model="-", stage=str(stage), mixer=name, count=1, input=f"{c}x{h}x{w}")
                try:
                    ctx = dict(feat_size=(h, w), stage_idx=stage, block_idx=0, proj_drop=0.)
                    mod = create_mixer(name, c, context=ctx, **dict(args.mixer_kwargs))
                    row["mixer"] = f"{name} ({type(mod).__name__})"
                    jobs.append((row, mod, (torch.zeros(1, c, h, w),), {}))
                except Exception as e:  # noqa: BLE001 - reported in the table
                    row["fwd_ms"] = f"error: {type(e).__name__}: {str(e)[:80]}"
                    jobs.append((row, None, None, None))
    else:
        models = args.models or default_models(args.zoo_only)
        for name in tqdm(models, desc="discovering mixers", disable=args.no_progress, leave=False):
            try:
                model = timm.create_model(name, **dict(args.model_kwargs)).eval()
                size = model.pretrained_cfg.get("input_size", (3, 224, 224))
                if args.img_size:
                    size = (size[0], args.img_size[0], args.img_size[-1])
                records = find_mixers(model, torch.randn(1, *size))
            except Exception as e:  # noqa: BLE001 - reported in the table
                jobs.append((dict(model=name, stage="-", mixer="-", count=0, input="-",
                                  fwd_ms=f"error: {type(e).__name__}: {str(e)[:80]}"), None, None, None))
                continue
            if not records:
                jobs.append((dict(model=name, stage="-", mixer="(no token mixer found)", count=0, input="-"),
                             None, None, None))
            for r in records:
                row = dict(model=name, stage=r["stage"], mixer=r["cls"], count=r["count"], input=r["shape"],
                           module_name=r["name"])
                jobs.append((row, copy.deepcopy(r["module"]), r["args"], r["kwargs"]))
            del model

    rows = []
    for row, mod, inputs, kwargs in tqdm(jobs, desc=f"timing mixers (batch {args.batch}, {device.type})",
                                         disable=args.no_progress):
        if mod is not None:
            try:
                row.update(time_module(mod, inputs, kwargs, args.batch, device, dtype, args.warmup,
                                       args.min_run_time, args.backward))
            except Exception as e:  # noqa: BLE001 - reported in the table
                row["fwd_ms"] = f"error: {type(e).__name__}: {str(e)[:80]}"
        rows.append(row)

    print(f"\nper-mixer times: batch {args.batch}, device {device}, dtype {args.dtype or 'float32'}, "
          f"median per call over {args.min_run_time:g} s (warmup {args.warmup}), "
          f"torch threads {torch.get_num_threads()}")
    _print_table(rows, args.backward)
    if args.csv:
        import csv
        cols = ["model", "stage", "mixer", "count", "input", "fwd_ms", "fwd_bwd_ms", "module_name"]
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()

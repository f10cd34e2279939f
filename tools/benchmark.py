#!/usr/bin/env python
"""Benchmark zoo models: params, MACs, inference throughput, training step time, peak memory; table, CSV and plot.

    python tools/benchmark.py --models identityformer_s12 caformer_s18 --batch-size 32
    python tools/benchmark.py --family randformer --device cuda --amp --plot randformer.png
    python tools/benchmark.py --all --no-train --img-size 224 --csv zoo.csv --plot zoo.png

Models: ``--models`` (zoo or timm names), ``--family`` (catalogue family, repeatable) or ``--all`` (every catalogue
variant). Fixed-size models (e.g. RandFormer) always run at their own size. MACs are FlopCounterMode FLOPs / 2 at the
benchmark resolution (matmul / conv / SDPA; the reference tables' rule). Peak memory: CUDA ``max_memory_allocated``, or
on CPU the peak resident-set growth sampled during the run. ``--plot`` draws throughput vs official top-1
(``model_cards/results.csv``), bubble area = params, with matplotlib if installed, else a built-in PNG writer.
"""
import argparse
import ast
import csv
import json
import os
import sys
import threading
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

COLUMNS = ("model", "family", "params_m", "gmacs", "img_size", "batch", "infer_img_s", "infer_ms", "train_img_s",
           "train_ms", "peak_mem_mb", "top1", "device")


def _kv(items):
    out = {}
    for item in items or ():
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def build_parser():
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
    p.add_argument("--num-warmup", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--no-infer", action="store_true", help="skip the inference benchmark")
    p.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="K=V", help="extra create_model kwargs")
    p.add_argument("--results", default=os.path.join(_ROOT, "model_cards", "results.csv"),
                   help="CSV of official top-1 (model,top1,source)")
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--plot", default=None, help="write a PNG: throughput vs top-1, bubble size = params")
    p.add_argument("--plot-size", default="900x600", help="WIDTHxHEIGHT of the plot")
    p.add_argument("--no-progress", action="store_true")
    return p


def select_models(args):
    from metaformer_zoo import zoo
    names = list(args.models or [])
    for fam in args.family or ():
        names += zoo.list_variants(fam)
    if args.all:
        names += zoo.list_variants(owner=args.owner)
    names = list(dict.fromkeys(names))
    if not names:
        raise SystemExit("error: no models selected (use --models, --family or --all)")
    import timm
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]  # median


def bench_model(name, device, batch_size, img_size=None, warmup=2, iters=5, infer=True, train=True, amp=False,
                channels_last=False, model_kwargs=None, top1=None):
    """One row of the benchmark table (dict with COLUMNS)."""
    import timm

    from metaformer_zoo import zoo
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
               infer_img_s=None, infer_ms=None, train_img_s=None, train_ms=None, peak_mem_mb=None, top1=top1,
               device=str(device))
    model = timm.create_model(name, **kwargs).to(device)
    x = torch.randn(batch_size, *size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    peak = 0.0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sampler = _RssSampler() if device.type != "cuda" else None
    if sampler:
        sampler.__enter__()
    try:
        if infer:
            model.eval()

            def step_infer():
                with torch.no_grad(), autocast:
                    model(x)

            t = _timeit(step_infer, device, warmup, iters)
            row.update(infer_ms=t * 1e3, infer_img_s=batch_size / t)
        if train:
            model.train()
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
            target = torch.randint(0, max(model.num_classes, 1), (batch_size,), device=device)

            def step_train():
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                opt.step()

            t = _timeit(step_train, device, max(warmup, 1), iters)
            row.update(train_ms=t * 1e3, train_img_s=batch_size / t)
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
            peak = sampler.delta_mb
        else:
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    row["peak_mem_mb"] = peak
    del model, x
    return row


def format_table(rows):
    def fmt(v, col):
        if v is None:
            return "-"
        if isinstance(v, float):
            if col in ("params_m", "gmacs"):
                return f"{v:.2f}" if col == "params_m" else f"{v:.3f}"
            return f"{v:.1f}"
        return str(v)

    cols = [c for c in COLUMNS if c != "device"]
    table = [cols] + [[fmt(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_plot(rows, path, size=(900, 600), device="cpu"):
    """Throughput (x, log) vs official top-1 (y), bubble area = params. Returns the number of points drawn."""
    pts = [r for r in rows if r.get("top1") is not None and (r.get("infer_img_s") or r.get("train_img_s"))]
    if not pts:
        raise SystemExit("error: --plot needs models with an official top-1 in the results CSV and a measured "
                         "throughput (do not combine --plot with --no-infer --no-train)")
    key = "infer_img_s" if all(r.get("infer_img_s") for r in pts) else "train_img_s"
    xs = [r[key] for r in pts]
    ys = [r["top1"] for r in pts]
    ps = [r["params_m"] for r in pts]
    width, height = size
    xlabel = f"{'inference' if key == 'infer_img_s' else 'training'} img/s ({device}, bs {pts[0]['batch']})"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
        fams = list(dict.fromkeys(r["family"] for r in pts))
        for f in fams:
            sel = [r for r in pts if r["family"] == f]
            ax.scatter([r[key] for r in sel], [r["top1"] for r in sel], s=[r["params_m"] * 8 for r in sel],
                       alpha=0.55, label=f or "other")
        for r in pts:
            ax.annotate(r["model"], (r[key], r["top1"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ImageNet-1k top-1 (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.savefig(path)
        plt.close(fig)
    else:
        from metaformer_zoo.plot import scatter_png
        scatter_png(path, xs, ys, ps, labels=[r["model"] for r in pts], groups=[r["family"] or "other" for r in pts],
                    width=width, height=height, title="top-1 vs throughput (bubble area = params)", xlabel=xlabel,
                    ylabel="ImageNet-1k top-1 (%)", log_x=True)
    return len(pts)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import metaformer_zoo  # noqa: F401
    from metaformer_zoo.hub import official_results

    names = select_models(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    results = official_results(args.results)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = names if (tqdm is None or args.no_progress) else tqdm(names, desc="benchmark", unit="model")
    rows = []
    for name in it:
        if hasattr(it, "set_postfix_str"):
            it.set_postfix_str(name)
        top1 = results.get(name, (None, ""))[0]
        try:
            row = bench_model(name, device, batch, args.img_size, args.num_warmup, args.num_iters,
                              infer=not args.no_infer, train=not args.no_train, amp=args.amp,
                              channels_last=args.channels_last, model_kwargs=_kv(args.model_kwargs), top1=top1)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory, unsupported size: report and go on
            print(f"\n{name}: failed: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
            row = dict(model=name, family="", device=str(device), top1=top1)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(format_table(rows))
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
        width, height = (int(v) for v in args.plot_size.lower().split("x"))
        n = write_plot(rows, args.plot, (width, height), device=device.type)
        print(f"plot: {args.plot} ({n} models)")
    return rows


if __name__ == "__main__":
    main()

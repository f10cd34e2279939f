"""Command line: ``python -m metaformer_zoo list`` (or the ``metaformer-zoo`` console script).

One row per variant: family, owner (zoo or timm), params (trainable + frozen where they differ), MACs at the default
resolution (FlopCounterMode FLOPs / 2, the counting rule of the reference tables) and whether weights are known.
"""
import argparse
import csv
import json
import sys


def _fmt_params(info):
    p = f"{info['params'] / 1e6:.2f}M"
    frozen = info["params"] - info["trainable_params"]
    return f"{info['trainable_params'] / 1e6:.2f}M+{frozen / 1e6:.2f}M frozen" if frozen else p


def cmd_list(args):
    import metaformer_zoo  # noqa: F401  (registers the zoo)
    from metaformer_zoo.zoo import list_variants, variant_info

    names = list_variants(args.family)
    if args.filter:
        import fnmatch
        names = [n for n in names if fnmatch.fnmatch(n, args.filter)]
    rows = []
    try:
        from tqdm import tqdm
        it = tqdm(names, desc="counting", file=sys.stderr, disable=args.format != "table" or not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        it = names
    for n in it:
        rows.append(variant_info(n, macs=not args.no_macs))
    if args.format == "json":
        print(json.dumps(rows, indent=1, default=str))
        return 0
    if args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["name", "family", "owner", "params", "trainable_params", "macs", "input_size", "weights"])
        for r in rows:
            w.writerow([r["name"], r["family"], r["owner"], r["params"], r["trainable_params"], r["macs"],
                        "x".join(map(str, r["input_size"][1:])), r["weights_source"]])
        return 0
    header = ["model", "family", "owner", "params", "GMACs", "input", "weights"]
    table = [[r["name"], r["family"], r["owner"], _fmt_params(r),
              "-" if r["macs"] is None else f"{r['macs'] / 1e9:.3f}", "x".join(map(str, r["input_size"][1:])),
              "yes" if r["weights"] else "no"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(header))
    print(line(["-" * w for w in widths]))
    for t in table:
        print(line(t))
    print(f"\n{len(rows)} variants in {len(set(r['family'] for r in rows))} families")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="metaformer_zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="list every zoo variant with params, MACs and weight availability")
    p.add_argument("--family", default=None, help="only this family")
    p.add_argument("--filter", default=None, help="fnmatch pattern on model names, e.g. 'caformer_*'")
    p.add_argument("--no-macs", action="store_true", help="skip MAC counting (faster)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = parser.parse_args(argv)
    return {"list": cmd_list}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

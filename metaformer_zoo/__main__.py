"""Command line: ``python -m metaformer_zoo list`` (or the ``metaformer-zoo`` console script).

``list``: one row per variant, families in the order of the README's Families table (``zoo.FAMILY_ORDER``): family,
owner (zoo or timm), params (with frozen buffers such as RandFormer's mixing matrices shown apart), MACs at the default
resolution (FlopCounterMode FLOPs / 2, the counting rule of the reference tables), the input size and whether
weights are known. Params and MACs come from the precomputed catalogue (``metaformer_zoo/catalogue.json``);
``--recompute`` counts every row now instead (about a minute for all variants on a small CPU).

``catalogue``: recount every variant and rewrite ``metaformer_zoo/catalogue.json`` (after adding or changing a
variant; the slow tests check the stored rows).
"""
import argparse
import csv
import fnmatch
import json
import sys
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

from .zoo import (CATALOGUE_PATH, build_catalogue, list_families, list_variants, load_catalogue, variant_info,
                  write_catalogue)


def _fmt_params(info: Dict) -> str:
    """``11.89M``, or ``11.89M+0.24M frozen buffer`` (and ``+X frozen`` for non-trainable parameters)."""
    frozen_params = info["params"] - info["trainable_params"] - info["frozen_buffers"]
    out = f"{info['trainable_params'] / 1e6:.2f}M"
    if frozen_params:
        out += f"+{frozen_params / 1e6:.2f}M frozen"
    if info["frozen_buffers"]:
        out += f"+{info['frozen_buffers'] / 1e6:.2f}M frozen buffer"
    return out


def _progress(names: List[str], desc: str, enabled: bool):
    return tqdm(names, desc=desc, file=sys.stderr, disable=not (enabled and sys.stderr.isatty()))


def cmd_list(args) -> int:
    families = [f.name for f in list_families()]
    if args.family is not None and args.family not in families:
        print(f"metaformer_zoo list: unknown family {args.family!r}; known families: {', '.join(families)}",
              file=sys.stderr)
        return 2
    names = list_variants(args.family)
    if args.filter:
        names = [n for n in names if fnmatch.fnmatch(n, args.filter)]
    stored = load_catalogue()
    live = [n for n in names if args.recompute or n not in stored]
    it = _progress(names, "counting", args.format == "table" and bool(live))
    rows = [variant_info(n, macs=not args.no_macs, recompute=args.recompute) for n in it]
    if args.format == "json":
        print(json.dumps(rows, indent=1, default=str))
        return 0
    if args.format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["name", "family", "owner", "params", "trainable_params", "frozen_buffers", "macs", "input_size",
                    "weights", "weights_source"])
        for r in rows:
            w.writerow([r["name"], r["family"], r["owner"], r["params"], r["trainable_params"], r["frozen_buffers"],
                        "" if r["macs"] is None else r["macs"], "x".join(map(str, r["input_size"][1:])),
                        "yes" if r["weights"] else "no", r["weights_source"]])
        return 0
    header = ["model", "family", "owner", "params", "GMACs", "input", "weights"]
    table = [[r["name"], r["family"], r["owner"], _fmt_params(r),
              "-" if r["macs"] is None else f"{r['macs'] / 1e9:.3f}", "x".join(map(str, r["input_size"][1:])),
              "yes" if r["weights"] else "no"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]

    def line(cells: Sequence) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    print(line(header))
    print(line(["-" * w for w in widths]))
    for t in table:
        print(line(t))
    print(f"\n{len(rows)} variants in {len(set(r['family'] for r in rows))} families")
    return 0


def cmd_catalogue(args) -> int:
    data = build_catalogue(progress=lambda names: _progress(names, "counting", True))
    write_catalogue(data, args.out)
    print(f"wrote {len(data['variants'])} rows to {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="metaformer_zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="list every zoo variant with params, MACs and weight availability")
    p.add_argument("--family", default=None, help="only this family")
    p.add_argument("--filter", default=None, help="fnmatch pattern on model names, e.g. 'caformer_*'")
    p.add_argument("--no-macs", action="store_true", help="leave the MACs column empty")
    p.add_argument("--recompute", action="store_true",
                   help="count params and MACs now instead of reading the precomputed catalogue (slow)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p = sub.add_parser("catalogue", help="recount every variant and rewrite the precomputed catalogue")
    p.add_argument("--out", default=CATALOGUE_PATH, help="where to write it (default: the package's catalogue.json)")
    args = parser.parse_args(argv)
    return {"list": cmd_list, "catalogue": cmd_catalogue}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

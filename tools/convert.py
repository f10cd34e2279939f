#!/usr/bin/env python
"""Convert an official checkpoint of any zoo family to a timm Hub folder (config.json, model.safetensors, README.md).

    python tools/convert.py --model identityformer_s12 --checkpoint identityformer_s12.pth --out hub/identityformer_s12
    python tools/convert.py --model caformer_s18 --checkpoint caformer_s18_in21k.pth --num-classes 21841 --out DIR
    python tools/convert.py ... --push my-org/identityformer_s12.sail_in1k     # upload after a successful check

The official file may be a plain state dict, a ``state_dict`` / ``model`` (or EMA) wrapped training checkpoint, or a
release file that pickles its training config (yacs ``CfgNode``: MS-MLP, Strip-MLP; ``argparse.Namespace``:
TransXNet). It is read by the safe reader every loading path uses (``metaformer_zoo.checkpoint.load_checkpoint_file``:
``weights_only=True`` with those two allow-listed, never ``weights_only=False``), so the file gives the same weights
here as through ``pretrained=True``, ``checkpoint_path=``, ``hubconf`` and the dense ``init_cfg``. Keys are remapped by
the family's filter and validated strictly: missing, unexpected or mis-shaped keys, truncated files and checkpoints of another
family are refused with exit code 2 and nothing is written. After export the folder is loaded back offline through
``local-dir:`` and through a ``pretrained_cfg_overlay`` file and its outputs are compared with the converted model
(exit code 3 if they differ). The result loads with::

    import timm, metaformer_zoo
    model = timm.create_model("local-dir:hub/identityformer_s12", pretrained=True)
"""
import argparse
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from timm.utils import ParseKwargs  # noqa: E402

from metaformer_zoo.cli import model_kwarg  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="zoo variant, e.g. identityformer_s12 (tag optional: name.tag)")
    p.add_argument("--checkpoint", required=True, help="official checkpoint file (.pth / .pth.tar / .bin / .safetensors)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size of the checkpoint (e.g. 21841)")
    p.add_argument("--model-kwargs", nargs="*", type=model_kwarg, action=ParseKwargs, default={}, metavar="K=V",
                   help="extra create_model kwargs (Python literals, timm's ParseKwargs)")
    p.add_argument("--push", default=None, metavar="REPO_ID", help="push the folder to the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--atol", type=float, default=1e-5, help="max abs logit difference accepted by the check")
    p.add_argument("--no-verify", action="store_true", help="skip the reload check (not recommended)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import metaformer_zoo  # noqa: F401  (registers the zoo with timm)
    from metaformer_zoo import hub
    from metaformer_zoo.checkpoint import CheckpointError

    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        model = hub.convert_checkpoint(args.model, args.checkpoint, **kwargs)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    arch = args.model.split(".")[0]
    name = args.model if "." in args.model else f"{arch}.{model.pretrained_cfg.get('tag') or 'converted'}"
    extra = {"repo_id": args.push} if args.push else {}
    model_args = {k: v for k, v in kwargs.items() if k != "num_classes"}
    paths = hub.export_folder(model, args.out, model_name=name, source=args.checkpoint, model_args=model_args,
                              extra_info=extra)
    report = {"model": name, "out": paths["dir"]}
    if not args.no_verify:
        try:
            diffs = hub.verify_folder(paths["dir"], model, atol=args.atol)
        except AssertionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        report["max_abs_diff"] = diffs
        # record the check in the config and the card
        cfg_path = paths["config"]
        config = json.load(open(cfg_path))
        config.setdefault("metaformer_zoo", {})["max_abs_diff"] = max(diffs.values())
        with open(cfg_path, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        info = dict(config["metaformer_zoo"])
        with open(paths["card"], "w") as f:
            f.write(hub.model_card(model, name, source=args.checkpoint, extra_info=info))
    if args.push:
        report["pushed"] = hub.push_folder(paths["dir"], args.push, private=args.private)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

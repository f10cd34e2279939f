"""Official checkpoints -> timm Hub folders: conversion, export, verification, model cards, weight-source errors.

The library side of ``tools/convert.py``::

    model = convert_checkpoint("identityformer_s12", "identityformer_s12.pth")   # official file -> zoo model
    export_folder(model, "out/identityformer_s12", source="identityformer_s12.pth")
    verify_folder("out/identityformer_s12", model)   # local-dir and file-overlay loads give the same outputs
    # timm.create_model("local-dir:out/identityformer_s12", pretrained=True) now works offline

Every family's spec (``metaformer_zoo.spec.FamilySpec.official``, an ``OfficialFormat``) describes its official
format: ``filter(state_dict, model)`` (official -> zoo layout, validated), ``to_official(model)`` (zoo -> official
layout, or ``None`` where no official code exists) and ``wrapper`` (``None`` = plain state dict, ``"state_dict"`` /
``"model"`` = wrapped); timm-owned families declare theirs in ``metaformer_zoo.models.timm_families`` (timm's own
``checkpoint_filter_fn`` made strict, plus the inverse key mapping). Files are read by the one safe reader of every
loading path (``metaformer_zoo.checkpoint.load_checkpoint_file``: weights-only, with the yacs ``CfgNode`` /
``argparse.Namespace`` configs of official files allow-listed), so a file converts here exactly as it loads through
``pretrained=True``, ``checkpoint_path=``, ``hubconf`` and the dense ``init_cfg``.

``weights_unavailable_error`` turns a failed download of pretrained weights into an error that names where the weights
would come from (URL / Hub id) and how to load them offline; ``metaformer_zoo.builder`` raises it for every zoo model.
"""
import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

from .builder import WeightsUnavailableError, weights_source, weights_unavailable_error
from .checkpoint import (
    CheckpointError, check_classifier, load_checkpoint_file, remap_keys, run_family_filter, unwrap_state_dict,
    validate_state_dict)
from .spec import FamilySpec, OfficialFormat
from .version import __version__
from .zoo import count_macs, count_params, family_of, list_families, published_results

__all__ = [
    "WeightsUnavailableError", "family_protocol", "load_official_file", "convert_checkpoint",
    "make_official_checkpoint", "export_folder", "verify_folder", "push_folder", "model_card", "weights_source",
    "weights_unavailable_error", "official_results", "sample_input",
]



# ---------------------------------------------------------------------------------------------------------------------
# family protocol: the ``official`` part of each family's spec


def family_protocol(family: Union[str, FamilySpec]) -> Optional[OfficialFormat]:
    """The official-checkpoint format of a catalogue family (a family name, a variant name or a spec), None if the
    family has no official code (``FamilySpec.official``)."""
    if isinstance(family, str):
        fam = next((f for f in list_families() if f.name == family), None) or family_of(family)
    else:
        fam = family
    return fam.official


# ---------------------------------------------------------------------------------------------------------------------
# conversion


def load_official_file(path: str) -> Any:
    """Read an official checkpoint file with the safe reader every loading path uses (errors: ``CheckpointError``)."""
    return load_checkpoint_file(path)


def convert_checkpoint(model_name: str, checkpoint: Union[str, Mapping[str, Any]], **model_kwargs) -> nn.Module:
    """Build ``model_name`` (no pretrained download) and load an official checkpoint (path or loaded object) into it.

    The family's filter maps the official layout to the zoo's, strictly: missing / unexpected / mis-shaped keys,
    unreadable files and checkpoints of another family raise ``CheckpointError`` and nothing is loaded. A checkpoint
    whose classifier has another number of classes than the model is refused too (pass ``num_classes=``).
    """
    fam = family_of(model_name)
    protocol = family_protocol(fam)
    if protocol is None:
        raise CheckpointError(f"family {fam.name!r} of {model_name} has no official checkpoint converter")
    raw = load_official_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    where = f"{source} -> {model_name}"
    state_dict = run_family_filter(
        protocol.filter, raw, model, where=where, failed=where, filter_name=fam.name,
        hint=f"The file is probably not an official {fam.name} checkpoint of this variant.")
    check_classifier(state_dict, model, where)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return model.eval()


def make_official_checkpoint(model: nn.Module, path: Optional[str] = None, model_name: Optional[str] = None):
    """The model's weights as its family's official file would hold them (layout + wrapper); saved if ``path``.

    Used for synthetic official checkpoints in tests. Raises ``CheckpointError`` for families without official code.
    """
    name = model_name or model.pretrained_cfg["architecture"]
    protocol = family_protocol(family_of(name))
    if protocol is None or protocol.to_official is None:
        raise CheckpointError(f"{name}: its family has no official checkpoint layout (to_official is None)")
    sd = protocol.to_official(model)
    obj = {protocol.wrapper: sd} if protocol.wrapper else sd
    if path is not None:
        torch.save(obj, path)
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# export / verify / push


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def export_folder(model: nn.Module, out_dir: str, model_name: Optional[str] = None, source: Optional[str] = None,
                  card: Optional[str] = None, model_args: Optional[dict] = None, extra_info: Optional[dict] = None
                  ) -> Dict[str, str]:
    """Write a timm Hub folder: ``config.json``, ``model.safetensors``, ``README.md`` (model card).

    Loads back offline with ``timm.create_model("local-dir:" + out_dir, pretrained=True)`` (after
    ``import metaformer_zoo``) or with ``pretrained_cfg_overlay=dict(file=out_dir + "/model.safetensors")``.
    ``card`` replaces the generated model card text; ``source`` (the official file) is recorded with its sha256.
    """
    name = model_name or model.pretrained_cfg["architecture"]
    arch = name.split(".")[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = dict(num_classes=model.num_classes, **(model_args or {}))
    save_for_hf(model, str(out), model_args=args, safe_serialization=True)

    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    config["architecture"] = arch
    config["num_classes"] = model.num_classes
    config.setdefault("model_args", {}).update(args)
    pcfg = config.setdefault("pretrained_cfg", {})
    pcfg["num_classes"] = model.num_classes
    for k in ("url", "hf_hub_id", "file", "source", "state_dict", "hf_hub_filename"):
        pcfg.pop(k, None)  # the folder itself is the source
    zoo_info = {"converted_by": f"metaformer_zoo {__version__}", "family": family_of(arch).name}
    if source:
        zoo_info["source_checkpoint"] = os.path.basename(str(source))
        if os.path.isfile(str(source)):
            zoo_info["source_sha256"] = _sha256(str(source))
    orig = getattr(model, "pretrained_cfg", {}) or {}
    if orig.get("url") or orig.get("hf_hub_id"):
        zoo_info["official_weights"] = orig.get("url") or orig.get("hf_hub_id")
    zoo_info.update(extra_info or {})
    config["metaformer_zoo"] = zoo_info
    cfg_path.write_text(json.dumps(config, indent=2, default=_json_default) + "\n")

    text = card if card is not None else model_card(model, name, source=source, extra_info=zoo_info)
    (out / "README.md").write_text(text)
    return {"dir": str(out), "config": str(cfg_path), "weights": str(out / "model.safetensors"),
            "card": str(out / "README.md")}


def sample_input(model: nn.Module, batch: int = 2, seed: int = 0, max_size: int = 64) -> torch.Tensor:
    """A deterministic small input the model accepts (its fixed size, else ``max_size`` rounded to its constraints)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans = int(getattr(model, "in_chans", 0) or cfg.get("input_size", (3,))[0])
    if cfg.get("fixed_input_size"):
        h, w = cfg["input_size"][1:]
    else:
        size = max(max_size, int(getattr(model, "min_input_size", 0) or 0))
        div = int(getattr(model, "input_divisor", 1) or 1)
        size = -(-size // div) * div
        h = w = size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, h, w, generator=g)


@torch.no_grad()
def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return (a.eval()(x) - b.eval()(x)).abs().max().item()


def verify_folder(folder: str, reference: nn.Module, atol: float = 1e-5, x: Optional[torch.Tensor] = None
                  ) -> Dict[str, float]:
    """Load ``folder`` through ``local-dir:`` and through a ``file`` overlay; compare both with ``reference``.

    Returns the max abs logit differences; raises ``AssertionError`` when one exceeds ``atol``.
    """
    folder = str(Path(folder).resolve())
    config = json.loads((Path(folder) / "config.json").read_text())
    x = sample_input(reference) if x is None else x
    via_dir = timm.create_model(f"local-dir:{folder}", pretrained=True)
    overlay = dict(file=os.path.join(folder, "model.safetensors"), num_classes=config["num_classes"])
    via_file = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                 **config.get("model_args", {}))
    diffs = {"local-dir": _max_diff(reference, via_dir, x), "file-overlay": _max_diff(reference, via_file, x)}
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise AssertionError(f"outputs of {folder} differ from the converted model: {bad} (atol {atol})")
    return diffs


def push_folder(folder: str, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Add model (converted with metaformer_zoo)") -> str:
    """Upload an exported folder to the Hugging Face Hub (creates the repo); returns the repo URL."""
    from huggingface_hub import HfApi
    api = HfApi(token=token, library_name="timm")
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(url)


# ---------------------------------------------------------------------------------------------------------------------
# model cards

def official_results(path: Optional[str] = None) -> Dict[str, Tuple[float, str]]:
    """Published top-1 as {model: (top1, source)}: from the family specs (``zoo.published_results``), or from a CSV
    with columns model, top1, source when ``path`` is given (e.g. ``model_cards/results.csv``, generated from the
    specs, or a file of the user's own numbers)."""
    if path is None:
        return published_results()
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            try:
                out[row["model"].strip()] = (float(row["top1"]), row.get("source", "").strip())
            except (KeyError, ValueError):
                continue
    return out


def _arxiv_id(text: str) -> str:
    m = re.search(r"(\d{4}\.\d{4,5})", text or "")
    return m.group(1) if m else ""


def model_card(model: nn.Module, model_name: Optional[str] = None, source: Optional[str] = None,
               extra_info: Optional[dict] = None, macs: Optional[int] = None) -> str:
    """Hub model card (README.md) with YAML front matter (library_name: timm, tags, license, datasets, metrics)."""
    name = model_name or model.pretrained_cfg["architecture"]
    arch = name.split(".")[0]
    fam = family_of(arch)
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    tag = cfg.get("tag") or (name.split(".", 1)[1] if "." in name else "")
    input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    total, trainable = count_params(model)
    if macs is None:
        try:
            meta = timm.create_model(arch, device="meta", num_classes=model.num_classes)
            macs = count_macs(meta, input_size, device="meta")
        except Exception:  # noqa: BLE001 - MACs are informative only
            macs = None
    license_ = cfg.get("license") or "apache-2.0"
    in22k = "22k" in tag or "21k" in tag or model.num_classes in (21841, 21843, 11821)
    datasets = ["imagenet-1k"] + (["imagenet-22k"] if in22k else [])
    top1 = official_results().get(arch) if model.num_classes == 1000 and not in22k else None
    paper_id = _arxiv_id(cfg.get("paper_ids", "")) or fam.arxiv or _arxiv_id(fam.paper)
    repo_id = (extra_info or {}).get("repo_id") or f"<org>/{name}"

    lines = ["---", "library_name: timm", f"license: {license_}", "tags:", "- image-classification", "- timm",
             "- metaformer-zoo", f"- {fam.name}", "datasets:"] + [f"- {d}" for d in datasets]
    lines += ["metrics:", "- accuracy", "pipeline_tag: image-classification"]
    if top1 is not None:
        lines += ["model-index:", f"- name: {arch}", "  results:", "  - task:", "      type: image-classification",
                  "    dataset:", "      name: ImageNet-1k", "      type: imagenet-1k", "    metrics:",
                  "    - type: accuracy", "      name: top-1 accuracy (official, not re-evaluated)",
                  f"      value: {top1[0]}"]
    lines += ["---", "", f"# Model card for {name}", ""]
    desc = f"{fam.name} image classification model, converted from the official checkpoint to the timm layout of " \
           f"metaformer-zoo (`import metaformer_zoo` registers the architecture with timm)."
    lines += [desc, "", "## Model Details", "",
              f"- **Model Type:** image classification / feature backbone",
              f"- **Architecture:** `{arch}` (family `{fam.name}`)",
              f"- **Params (M):** {total / 1e6:.2f}" + (f" ({trainable / 1e6:.2f} trainable)" if trainable != total
                                                         else ""),
              (f"- **GMACs:** {macs / 1e9:.3f} (FlopCounterMode / 2, matmul/conv/SDPA only)" if macs else
               "- **GMACs:** n/a"),
              f"- **Image size:** {input_size[1]} x {input_size[2]}" + (" (fixed)" if cfg.get("fixed_input_size")
                                                                         else ""),
              f"- **Preprocessing:** {cfg.get('interpolation', 'bicubic')} resize, crop_pct {cfg.get('crop_pct')}, "
              f"mean {tuple(cfg.get('mean', ()))}, std {tuple(cfg.get('std', ()))}",
              f"- **Dataset:** {', '.join(datasets)}"]
    if fam.paper:
        lines.append(f"- **Paper:** {fam.paper}" + (f" https://arxiv.org/abs/{paper_id}" if paper_id else ""))
    if fam.code or cfg.get("origin_url"):
        lines.append(f"- **Original:** {fam.code or cfg.get('origin_url')}")
    info = extra_info or {}
    if info.get("official_weights"):
        lines.append(f"- **Official weights:** {info['official_weights']}")
    if source:
        lines.append(f"- **Converted from:** `{os.path.basename(str(source))}`"
                     + (f" (sha256 `{info['source_sha256']}`)" if info.get("source_sha256") else ""))
    if info.get("max_abs_diff") is not None:
        lines.append(f"- **Conversion check:** max |logit diff| {info['max_abs_diff']:.3g} vs the converted model")
    if top1 is not None:
        lines.append(f"- **ImageNet-1k top-1 (official):** {top1[0]} ({top1[1]})")
    lines += ["", "## Model Usage", "", "```python", "import timm, torch", "import metaformer_zoo  # registers the zoo",
              "", f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)  # or 'local-dir:/path/to/folder'",
              "model = model.eval()",
              "cfg = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**cfg)",
              f"logits = model(torch.randn(1, {input_size[0]}, {input_size[1]}, {input_size[2]}))",
              "features = timm.create_model(model.pretrained_cfg['architecture'], features_only=True)  # 4 stages",
              "```", ""]
    if fam.card:
        lines += [f"See `model_cards/{fam.card}.md` in metaformer-zoo for all variants and known deviations.", ""]
    cite = fam.citation
    if cite:
        lines += ["## Citation", "", "```bibtex", cite, "```", ""]
    return "\n".join(lines)

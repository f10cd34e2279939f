"""The bundled default dataset: scikit-learn's handwritten digits as an ImageNet-style ImageFolder.

1,797 real 8x8 grey images of the digits 0-9 ship with scikit-learn (no download). ``prepare_digits`` writes them
out, upsampled to ``size`` x ``size`` RGB PNGs, as ``<root>/train/<class>/*.png`` and ``<root>/validation/<class>/*.png``
(a fixed stratified split), so training on them exercises exactly the ImageFolder path used for ImageNet.
"""
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["prepare_digits", "default_data_root", "find_split", "IMAGE_FOLDER_LAYOUT", "EVAL_SPLITS"]

IMAGE_FOLDER_LAYOUT = "ROOT/train/<class>/<image> and ROOT/validation/<class>/<image> (or ROOT/val/)"
EVAL_SPLITS = ("validation", "val", "eval")

_VERSION = 1


def default_data_root() -> str:
    return os.environ.get("METAFORMER_ZOO_DATA", os.path.join(os.path.expanduser("~"), ".cache", "metaformer_zoo",
                                                              "data"))


def prepare_digits(root: Optional[str] = None, size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> str:
    """Write the digits ImageFolder (once; reused when present) and return its directory."""
    from sklearn.datasets import load_digits  # ~1 s to import, only needed to write the dataset once

    root = os.path.join(root or default_data_root(), f"digits_{size}px")
    marker = os.path.join(root, "dataset.json")
    meta = dict(name="sklearn-digits", version=_VERSION, size=size, val_fraction=val_fraction, seed=seed)
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f).get("meta") == meta:
                return root
    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) in 0..16, labels 0..9
    rng = np.random.RandomState(seed)
    counts = {"train": 0, "validation": 0}
    tmp = root + ".tmp"
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("validation", idx[:n_val]), ("train", idx[n_val:])):
            d = os.path.join(tmp, split, str(cls))
            os.makedirs(d, exist_ok=True)
            for i in part:
                arr = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
                img.save(os.path.join(d, f"{i:04d}.png"))
                counts[split] += 1
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(dict(meta=meta, counts=counts, classes=[str(c) for c in range(10)]), f, indent=1)
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def _class_dirs(path: str) -> list:
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def find_split(root: str, split: str, alternatives: Sequence[str] = ()) -> str:
    """Return the name of the ``split`` folder of the ImageFolder ``root`` (or the first of ``alternatives`` present).

    Raises ``ValueError`` saying what is missing and which layout is expected when ``root`` does not exist, has no
    such split folder, or the split folder holds no class folders (timm would otherwise assert without a message, or
    silently treat ``root`` itself as the split).
    """
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise ValueError(f"{root} {what}; expected an ImageFolder root laid out as {IMAGE_FOLDER_LAYOUT}")
    names = [split] + [a for a in alternatives if a != split]
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            if not _class_dirs(path):
                raise ValueError(f"{path} holds no class folders; expected {IMAGE_FOLDER_LAYOUT}")
            return name
    found = sorted(os.listdir(root))
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "") if found else "nothing"
    raise ValueError(f"{root} has no {' or '.join(n + '/' for n in names)} folder (it holds: {shown}); expected an "
                     f"ImageFolder root laid out as {IMAGE_FOLDER_LAYOUT}")

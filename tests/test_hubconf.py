"""hubconf.py: torch.hub.load(<checkout>, name, source="local") builds zoo and catalogued timm-owned models."""
import importlib.util
from pathlib import Path

import torch

import metaformer_zoo  # noqa: F401
from metaformer_zoo import zoo

ROOT = Path(__file__).resolve().parents[1]


def _hubconf():
    spec = importlib.util.spec_from_file_location("zoo_hubconf", ROOT / "hubconf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hub_entrypoints_cover_catalogue():
    mod = _hubconf()
    assert mod.dependencies == ["torch", "timm"]
    names = {n for n in dir(mod) if callable(getattr(mod, n)) and not n.startswith("_")}
    assert set(zoo.zoo_registered_models()) <= names
    assert set(zoo.list_variants(owner="timm")) <= names


def test_hub_load_zoo_and_timm_models():
    model = torch.hub.load(str(ROOT), "identityformer_s12", source="local", num_classes=7,
                           depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    assert model.pretrained_cfg["architecture"] == "identityformer_s12" and model.num_classes == 7
    out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 7)
    meta = torch.hub.load(str(ROOT), "poolformerv2_s12", source="local", device="meta")
    assert sum(p.numel() for p in meta.parameters()) == 11_891_712  # reference/metaformer.md §2.2


def test_hub_load_official_checkpoint(tmp_path):
    """An official release file (MS-MLP: pickles a yacs config) through torch.hub.load(..., checkpoint_path=...)."""
    from test_loading import write_official
    kw = dict(dims=(10, 20, 40, 80), depths=(1, 1, 1, 1))
    path = tmp_path / "msmlp_tiny_patch4_ckpt_epoch299.pth"
    src = write_official("msmlp_tiny", path, **kw)
    model = torch.hub.load(str(ROOT), "msmlp_tiny", source="local", checkpoint_path=str(path), **kw)
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())

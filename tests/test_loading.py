"""One official file, every loading path, the same safe reader and the same weights (issue 11, items 2-4).

Paths: ``pretrained=True`` with a ``pretrained_cfg_overlay`` file, ``pretrained=True`` from a URL (served from a
pre-filled ``$TORCH_HOME`` cache, no network), ``checkpoint_path=``, ``tools/convert.py`` (then ``local-dir:``),
``hubconf`` and the dense adapter's checkpoint (``init_cfg`` loads through the same ``load_checkpoint``). Official
files are written here in each family's release format: MS-MLP / Strip-MLP pickle a yacs ``CfgNode`` config (written
with a fake ``yacs`` module that is removed before loading), TransXNet an ``argparse.Namespace``.
"""
import argparse
import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import timm
import torch

import metaformer_zoo  # noqa: F401
from helpers import perturb
from metaformer_zoo import hub, zoo
from metaformer_zoo.checkpoint import CheckpointError, load_checkpoint_file
from metaformer_zoo.dense.core import DenseBackbone

ROOT = Path(__file__).resolve().parents[1]

# tiny configs of the default stage, one per on-disk format: plain, yacs-pickled x2 (the Namespace-pickled timm
# CheckpointSaver format: test_ema_weights_are_picked_the_same_way_everywhere; TransXNet's own under -m slow)
TINY = {
    "identityformer_s12": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "msmlp_tiny": dict(dims=(10, 20, 40, 80), depths=(1, 1, 1, 1)),
    "stripmlp_light_t": dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
}


def _zoo_official_families():
    out = []
    for fam in zoo.list_families():
        proto = hub.family_protocol(fam)
        if fam.owner != "timm" and proto is not None and proto.to_official is not None and fam.variants:
            out.append(fam.name)
    return out


def _smallest(family):
    names = zoo.list_variants(family)
    return min(names, key=lambda n: zoo.count_params(timm.create_model(n, device="meta"))[0])




class _FakeYacs:
    """``yacs.config.CfgNode`` as yacs pickles it (a dict subclass with ``__dict__`` flags), only while writing."""

    def __enter__(self):
        class CfgNode(dict):
            def __init__(self, init_dict=None):
                super().__init__(init_dict or {})
                self.__dict__["__immutable__"] = True
                self.__dict__["__new_allowed__"] = False

        CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
        pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")
        mod.CfgNode, pkg.config = CfgNode, mod
        sys.modules["yacs"], sys.modules["yacs.config"] = pkg, mod
        return CfgNode

    def __exit__(self, *exc):
        del sys.modules["yacs"], sys.modules["yacs.config"]


def write_official(name, path, seed=0, **kwargs):
    """A perturbed model and its weights saved as the family's official release file; returns the model."""
    src = perturb(timm.create_model(name, **kwargs), seed)
    obj = hub.make_official_checkpoint(src, model_name=name)
    family = zoo.family_of(name).name
    if family in ("msmlp", "stripmlp"):  # Swin-style utils.save_checkpoint
        with _FakeYacs() as CfgNode:
            cfg = CfgNode({"MODEL": CfgNode({"TYPE": family, "DEPTHS": [1, 1, 1, 1]}), "DATA": CfgNode({"IMG": 224})})
            torch.save(dict(obj, optimizer={"state": {}, "param_groups": [{"lr": 5e-6, "params": [0]}]},
                            lr_scheduler={"t_initial": 300}, max_accuracy=81.0, epoch=299, config=cfg), path)
    elif family == "transxnet":  # timm CheckpointSaver
        torch.save(dict(obj, epoch=299, arch=name, args=argparse.Namespace(model=name, lr=2e-3)), path)
    else:
        torch.save(obj, path)
    assert "yacs" not in sys.modules
    return src


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_every_way(name, path, tmp_path, monkeypatch, verify=True, **kwargs):
    """{path name: state dict} of the same official file loaded through every loading path (``verify``: let
    tools/convert.py run its own reload check too)."""
    path = str(path)
    out = {}
    out["file overlay"] = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    cache = tmp_path / "torch_home"
    (cache / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(path, cache / "hub" / "checkpoints" / Path(path).name)
    monkeypatch.setenv("TORCH_HOME", str(cache))
    url = f"https://weights.invalid/releases/{Path(path).name}"
    out["url"] = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url, hf_hub_id=None),
                                   **kwargs)
    out["checkpoint_path"] = timm.create_model(name, checkpoint_path=path, **kwargs)
    cli = _module("zoo_convert_cli", ROOT / "tools" / "convert.py")
    folder = tmp_path / "converted"
    assert cli.main(["--model", name, "--checkpoint", path, "--out", str(folder), *([] if verify else ["--no-verify"]),
                     "--model-kwargs", *[f"{k}={v!r}" for k, v in kwargs.items()]]) == 0
    out["convert.py + local-dir"] = timm.create_model(f"local-dir:{folder}", pretrained=True)
    hubconf = _module("zoo_hubconf", ROOT / "hubconf.py")
    out["hubconf"] = getattr(hubconf, name)(pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    out["dense"] = DenseBackbone(name, out_norms=False, model_kwargs=kwargs, checkpoint=path).model
    return {k: m.state_dict() for k, m in out.items()}


def assert_same_weights(src, loaded):
    ref = src.state_dict()
    for how, sd in loaded.items():
        keys = set(sd) if how == "dense" else set(ref)  # the dense trunk is the model minus its head
        assert set(sd) == keys and keys <= set(ref), how
        bad = [k for k in keys if not torch.equal(sd[k], ref[k])]
        assert not bad, f"{how}: {bad[:5]}"


@pytest.mark.parametrize("name", list(TINY))
def test_official_file_loads_identically_every_way(name, tmp_path, monkeypatch):
    path = tmp_path / f"{name}_official.pth"
    src = write_official(name, path, **TINY[name])
    assert_same_weights(src, load_every_way(name, path, tmp_path, monkeypatch, **TINY[name]))
    assert "yacs" not in sys.modules  # nothing imported yacs (or a stand-in module) behind our back


@pytest.mark.slow
@pytest.mark.parametrize("family", _zoo_official_families())
def test_every_family_smallest_variant_every_way(family, tmp_path, monkeypatch):
    name = _smallest(family)
    path = tmp_path / f"{name}_official.pth"
    src = write_official(name, path)
    assert_same_weights(src, load_every_way(name, path, tmp_path, monkeypatch, verify=False))


def test_yacs_files_are_refused_by_plain_weights_only_but_read_safely(tmp_path):
    """Without the zoo, torch's weights-only reader refuses these files; after ``import metaformer_zoo`` the name
    ``yacs.config.CfgNode`` (only) reads as a plain OrderedDict, even in timm's own reader (``checkpoint_path=``)."""
    path = tmp_path / "msmlp.pth"
    write_official("msmlp_tiny", path, **TINY["msmlp_tiny"])
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=True)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "yacs.config.CfgNode" in proc.stderr
    obj = load_checkpoint_file(str(path))
    assert type(obj["config"]) is dict and obj["config"]["MODEL"]["TYPE"] == "msmlp" and obj["epoch"] == 299
    assert "yacs" not in sys.modules
    # the process-wide registration is the CfgNode stand-in alone: other objects stay refused
    evil = tmp_path / "ns.pth"
    torch.save({"w": torch.ones(1), "x": _Evil()}, evil)
    with pytest.raises(Exception, match="print"):
        torch.load(evil, weights_only=True)


def test_custom_load_flag_is_harmless(tmp_path):
    """Strip-MLP with ``custom_load=True`` used to raise AttributeError (no load_pretrained): zoo models take timm's
    standard path (with the zoo's allow-list) whatever the flag says."""
    kw = TINY["stripmlp_light_t"]
    path = tmp_path / "strip.pth"
    src = write_official("stripmlp_light_t", path, **kw)
    model = timm.create_model("stripmlp_light_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path),
                              custom_load=True), **kw)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


def test_ema_weights_are_picked_the_same_way_everywhere(tmp_path, monkeypatch):
    """A timm training file (``state_dict``, ``state_dict_ema``, pickled ``argparse.Namespace`` args): every path reads
    it (the URL path too, where timm's reader allows no Namespace itself) and takes the EMA weights, as timm does."""
    name, kw = "identityformer_s12", TINY["identityformer_s12"]
    raw, ema = perturb(timm.create_model(name, **kw), 1), perturb(timm.create_model(name, **kw), 2)
    path = tmp_path / "train.pth.tar"
    torch.save({"state_dict": hub.make_official_checkpoint(raw, model_name=name),
                "state_dict_ema": hub.make_official_checkpoint(ema, model_name=name), "epoch": 3,
                "args": argparse.Namespace(model=name, lr=1e-3)}, path)  # timm CheckpointSaver pickles the args
    assert_same_weights(ema, load_every_way(name, path, tmp_path, monkeypatch, **kw))


# ---------------------------------------------------------------------------------------------------------------------
# bad files and misfits: CheckpointError naming the file, the problem and the fix; nothing loaded


def _overlay(path, name="identityformer_s12"):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY[name])


@pytest.mark.parametrize("kind, match", [
    ("truncated", "truncated or corrupt"), ("empty", "empty"), ("text", "text file"), ("junk", "truncated or corrupt"),
])
def test_unreadable_files_through_the_overlay(kind, match, tmp_path, monkeypatch):
    good = tmp_path / "good.pth"
    write_official("identityformer_s12", good, **TINY["identityformer_s12"])
    data = {"truncated": good.read_bytes()[:2000], "empty": b"", "junk": bytes(range(256)) * 8,
            "text": b"<!DOCTYPE html><html><body>Not Found</body></html>\n"}[kind]
    bad = tmp_path / f"{kind}.pth"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match=match) as info:
        _overlay(bad)
    msg = str(info.value)
    assert str(bad) in msg and "Nothing was loaded" in msg and "weights_only=False" not in msg
    # a broken cached download of a URL source: the same error
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(bad, cache / "release.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match=match):
        timm.create_model("identityformer_s12", pretrained=True, **TINY["identityformer_s12"],
                          pretrained_cfg_overlay=dict(url="https://weights.invalid/release.pth", hf_hub_id=None))
    # the same error from the zoo's own reader (tools/convert.py, dense)
    with pytest.raises(CheckpointError, match=match):
        hub.convert_checkpoint("identityformer_s12", str(bad), **TINY["identityformer_s12"])


class _Evil:
    def __reduce__(self):
        return (print, ("PWNED",))


def test_foreign_pickles_are_never_run(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    model = timm.create_model("identityformer_s12", **TINY["identityformer_s12"])
    torch.save({"state_dict": hub.make_official_checkpoint(model, model_name="identityformer_s12"), "x": _Evil()},
               path)
    with pytest.raises(CheckpointError, match=r"pickles objects other than tensors and plain data \(builtins.print\)"):
        _overlay(path)
    with pytest.raises(CheckpointError, match="builtins.print"):
        DenseBackbone("identityformer_s12", model_kwargs=TINY["identityformer_s12"], checkpoint=str(path))
    assert "PWNED" not in capsys.readouterr().out


def test_checkpoint_path_misfits_are_checkpoint_errors(tmp_path):
    kw = TINY["identityformer_s12"]
    path = tmp_path / "official.pth"
    write_official("identityformer_s12", path, **kw)
    with pytest.raises(CheckpointError, match=r"missing key\(s\)"):  # another variant (depths)
        timm.create_model("identityformer_s12", checkpoint_path=str(path), **dict(kw, depths=(1, 1, 2, 1)))
    with pytest.raises(CheckpointError, match="num_classes=1000"):  # another classifier size
        timm.create_model("identityformer_s12", checkpoint_path=str(path), num_classes=10, **kw)
    pool = tmp_path / "poolformer.pth"
    hub.make_official_checkpoint(timm.create_model("poolformer_s12"), str(pool), model_name="poolformer_s12")
    with pytest.raises(CheckpointError, match="another family"):
        timm.create_model("identityformer_s12", checkpoint_path=str(pool), **kw)


def test_failed_official_load_changes_no_parameter(tmp_path):
    kw = TINY["msmlp_tiny"]
    model = timm.create_model("msmlp_tiny", **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    official = hub.make_official_checkpoint(perturb(timm.create_model("msmlp_tiny", **kw)), model_name="msmlp_tiny")
    bad = dict(official["model"])
    bad.pop("layers.2.blocks.0.pwconv1.weight")
    bad["layers.0.blocks.0.gamma"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*\n.*mis-shaped"):
        model.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(official["model"])  # the whole official layout converts
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # zoo-layout dicts load as torch loads them (partial loads with strict=False included)
    result = model.load_state_dict({"head.fc.bias": torch.zeros(1000)}, strict=False)
    assert "head.fc.bias" not in result.missing_keys and not result.unexpected_keys


def test_dense_https_checkpoint_uses_the_torch_hub_cache(tmp_path, monkeypatch):
    name, kw = "stripmlp_light_t", TINY["stripmlp_light_t"]
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    src = write_official(name, cache / "strip_official.pth", **kw)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    url = "https://weights.invalid/strip_official.pth"
    dense = DenseBackbone(name, out_norms=False, model_kwargs=kw, checkpoint=url)
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in dense.model.state_dict().items())

"""Official checkpoint -> zoo layout -> timm Hub folder -> offline reload, for every family of the catalogue.

Synthetic official checkpoints come from each family's ``to_official`` (the inverse of its filter). Checks: every
family's official layout maps back onto its model (names and shapes, on the meta device); full round trips keep the
outputs; bad files (truncated, corrupt, missing / unexpected / mis-shaped keys, other family, other head) are refused
with a ``CheckpointError`` naming the problem, and ``tools/convert.py`` exits with code 2 and no traceback.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import metaformer_zoo  # noqa: F401
from helpers import load_script, perturb
from metaformer_zoo import hub, zoo
from metaformer_zoo.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))  # identityformer_s12 shrunk for the error-path tests
# full round trips in the default run (the lead's zoo families); every other family runs under -m slow
DEFAULT_ROUNDTRIP = ("identityformer", "randformer")


def _official_families():
    out = []
    for fam in zoo.list_families():
        proto = hub.family_protocol(fam)
        if proto is not None and proto.to_official is not None and fam.variants:
            out.append(fam.name)
    return out


FAMILIES = _official_families()


def _smallest(family):
    names = zoo.list_variants(family)
    return min(names, key=lambda n: zoo.count_params(timm.create_model(n, device="meta"))[0])




def _load_cli():
    return load_script("tools/convert.py", "zoo_convert_cli")


def test_catalogue_has_converters():
    assert "identityformer" in FAMILIES and "randformer" in FAMILIES
    for timm_family in ("poolformer", "poolformerv2", "convformer", "caformer", "mambaout"):
        assert timm_family in FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_official_layout_maps_back(family):
    """to_official -> (wrapper) -> filter_fn gives exactly the model's names and shapes (meta device, no data)."""
    name = _smallest(family)
    proto = hub.family_protocol(family)
    try:  # names and shapes only: the meta device is enough (and instant) for most families
        model = timm.create_model(name, device="meta")
        obj = hub.make_official_checkpoint(model, model_name=name)
    except (NotImplementedError, RuntimeError):  # a to_official that needs real data
        model = timm.create_model(name)
        obj = hub.make_official_checkpoint(model, model_name=name)
    if proto.wrapper:
        assert set(obj) == {proto.wrapper}
    out = proto.filter(obj, model)
    target = model.state_dict()
    assert sorted(out) == sorted(target)
    assert all(tuple(out[k].shape) == tuple(target[k].shape) for k in target)


def _roundtrip(family, tmp_path):
    name = _smallest(family)
    src = perturb(timm.create_model(name))
    path = tmp_path / f"{name}_official.pth"
    hub.make_official_checkpoint(src, str(path), model_name=name)
    model = hub.convert_checkpoint(name, str(path))
    x = hub.sample_input(model, batch=1)
    with torch.no_grad():
        ref, out = src(x), model(x)
    assert torch.equal(ref, out) or (ref - out).abs().max().item() < 1e-5
    folder = tmp_path / "hub"
    paths = hub.export_folder(model, str(folder), source=str(path))
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads(Path(paths["config"]).read_text())
    assert config["architecture"] == name and config["num_classes"] == model.num_classes
    assert "model_args" in config and "pretrained_cfg" in config
    assert "url" not in config["pretrained_cfg"] and config["metaformer_zoo"]["family"] == family
    # local-dir: and file-overlay reloads reproduce the *source* model's outputs
    diffs = hub.verify_folder(str(folder), src, x=x)
    assert max(diffs.values()) < 1e-5
    card = Path(paths["card"]).read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "datasets:" in card and "metrics:" in card


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in DEFAULT_ROUNDTRIP])
def test_roundtrip_default(family, tmp_path):
    _roundtrip(family, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in DEFAULT_ROUNDTRIP])
def test_roundtrip_all_families(family, tmp_path):
    _roundtrip(family, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_official_layout_maps_back_all_variants(family):
    proto = hub.family_protocol(family)
    for name in zoo.list_variants(family):
        model = timm.create_model(name, device="meta")
        out = proto.filter(hub.make_official_checkpoint(model, model_name=name), model)
        assert sorted(out) == sorted(model.state_dict()), name


# ---------------------------------------------------------------------------------------------------------------------
# error paths (a shrunk identityformer_s12 keeps them fast)


@pytest.fixture(scope="module")
def tiny():
    model = perturb(timm.create_model("identityformer_s12", **TINY))
    return model, hub.make_official_checkpoint(model, model_name="identityformer_s12")


def _convert(sd, **kw):
    return hub.convert_checkpoint("identityformer_s12", sd, **dict(TINY, **kw))


def test_wrapped_and_safetensors_files_convert(tiny, tmp_path):
    model, sd = tiny
    x = hub.sample_input(model)
    for i, obj in enumerate(({"state_dict": sd, "epoch": 3}, {"model": sd}, {"module." + k: v for k, v in sd.items()})):
        path = tmp_path / f"w{i}.pth"
        torch.save(obj, path)
        with torch.no_grad():
            assert torch.equal(_convert(str(path))(x), model(x))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "official.safetensors")
    with torch.no_grad():
        assert torch.equal(_convert(str(tmp_path / "official.safetensors"))(x), model(x))


def test_truncated_and_corrupt_files(tiny, tmp_path):
    _, sd = tiny
    full = tmp_path / "full.pth"
    torch.save(sd, full)
    data = full.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(os.urandom(4096))
    for bad in ("trunc.pth", "junk.pth"):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            _convert(str(tmp_path / bad))
    with pytest.raises(CheckpointError, match="not found"):
        _convert(str(tmp_path / "nope.pth"))


def test_missing_unexpected_misshaped_keys(tiny):
    _, sd = tiny
    missing = dict(sd)
    missing.pop("stages.2.0.norm1.weight")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): stages\.2\.blocks\.0\.norm1\.weight"):
        _convert(missing)
    extra = dict(sd, **{"stages.2.0.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): stages\.2\.blocks\.0\.extra\.weight"):
        _convert(extra)
    shaped = dict(sd, **{"stages.1.0.norm2.weight": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"mis-shaped.*stages\.1\.blocks\.0\.norm2\.weight"):
        _convert(shaped)


def test_other_family_variant_and_head_refused(tiny):
    model, sd = tiny
    # RandFormer of the same size: frozen mixing matrices are unexpected here
    rand = timm.create_model("randformer_s12", device="meta", **TINY)
    with pytest.raises(CheckpointError, match="random_matrix"):
        _convert(hub.make_official_checkpoint(rand, model_name="randformer_s12"))
    # PoolFormer v1 layout (another repo's key names)
    pool = timm.create_model("poolformer_s12", device="meta")
    with pytest.raises(CheckpointError, match="another family"):
        _convert(hub.make_official_checkpoint(pool, model_name="poolformer_s12"))
    # another variant (depths)
    with pytest.raises(CheckpointError, match="missing"):
        hub.convert_checkpoint("identityformer_s12", sd, **dict(TINY, depths=(1, 1, 2, 1)))
    # another head size: refused with the fix
    head = dict(sd, **{"head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)})
    with pytest.raises(CheckpointError, match="num_classes=10"):
        _convert(head)
    assert _convert(head, num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="not a zoo variant"):
        hub.convert_checkpoint("resnet18", sd)


class _Foreign:
    def __reduce__(self):
        return (print, ("PWNED",))


def test_files_with_config_objects(tiny, tmp_path, capsys):
    """The known harmless config objects of official files (argparse.Namespace, yacs CfgNode: tests/test_loading.py)
    are read by the one safe reader of every family; any other pickled object is refused, never run."""
    import argparse
    model, sd = tiny
    path = tmp_path / "with_cfg.pth"
    torch.save({"model": sd, "config": argparse.Namespace(depth=12), "epoch": 300}, path)
    x = hub.sample_input(model)
    with torch.no_grad():
        assert torch.equal(_convert(str(path))(x), model(x))
    torch.save({"model": sd, "config": _Foreign(), "epoch": 300}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"pickles objects other than tensors.*builtins\.print"):
        _convert(str(tmp_path / "foreign.pth"))
    assert "PWNED" not in capsys.readouterr().out


def test_cli_converts_and_verifies(tiny, tmp_path, capsys):
    model, sd = tiny
    path = tmp_path / "official.pth"
    torch.save(sd, path)
    cli = _load_cli()
    out = tmp_path / "folder"
    rc = cli.main(["--model", "identityformer_s12", "--checkpoint", str(path), "--out", str(out), "--model-kwargs",
                   "depths=(1,1,1,1)", "dims=(8,16,24,32)"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert max(report["max_abs_diff"].values()) < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert list(config["model_args"]["dims"]) == [8, 16, 24, 32]
    assert config["metaformer_zoo"]["source_sha256"]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    overlay = timm.create_model("identityformer_s12", pretrained=True, **TINY,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    x = hub.sample_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(overlay(x), model(x))
    assert "max |logit diff|" in (out / "README.md").read_text()
    # refusal path in-process: exit code 2, message on stderr, nothing written
    bad = dict(sd)
    bad.pop("head.bias")
    torch.save(bad, tmp_path / "bad.pth")
    rc = cli.main(["--model", "identityformer_s12", "--checkpoint", str(tmp_path / "bad.pth"), "--out",
                   str(tmp_path / "nothing"), "--model-kwargs", "depths=(1,1,1,1)", "dims=(8,16,24,32)"])
    assert rc == 2 and "missing key(s): head.fc.bias" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_cli_exit_code_on_truncated_file(tmp_path):
    (tmp_path / "t.pth").write_bytes(b"PK\x03\x04 truncated")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert.py"), "--model", "identityformer_s12",
                           "--checkpoint", str(tmp_path / "t.pth"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_push_folder_uses_hub_api(tmp_path, monkeypatch):
    """--push: create the repo (exist_ok) and upload the folder; no network (HfApi replaced)."""
    import huggingface_hub
    calls = []

    class FakeApi:
        def __init__(self, token=None, **kw):
            calls.append(("init", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = hub.push_folder(str(tmp_path), "org/identityformer_s12.sail_in1k", private=True, token="t")
    assert url == "https://huggingface.co/org/identityformer_s12.sail_in1k"
    assert calls == [("init", "t"), ("create_repo", "org/identityformer_s12.sail_in1k", True, True),
                     ("upload_folder", "org/identityformer_s12.sail_in1k", str(tmp_path))]


def test_filter_crash_reported_as_checkpoint_error(tiny, monkeypatch):
    """A family filter that crashes on a foreign file (KeyError ...) still gives a CheckpointError, not a traceback."""
    _, sd = tiny
    fam = zoo.family_of("identityformer_s12")

    def crashing(state_dict, model):
        return {k: state_dict["no.such.key"] for k in state_dict}

    monkeypatch.setitem(zoo._FAMILIES, fam.name, dataclasses.replace(
        fam, official=dataclasses.replace(fam.official, filter=crashing)))
    with pytest.raises(CheckpointError, match="filter failed with KeyError"):
        _convert(sd)

"""default_cfgs audit for every zoo-registered model (``metaformer_zoo.zoo.zoo_registered_models()``).

Every pretrained cfg must carry what timm's data pipeline and Hub export need (input size, crop_pct, interpolation,
mean/std, license, first_conv / classifier naming real parameters), official weights must be declared where the
family's code released them, and ``timm.create_model(name, pretrained=True)`` without network must fail with an error
that names where the weights would come from.
"""
import re
import urllib.error

import pytest
import timm
import torch

import metaformer_zoo  # noqa: F401
from metaformer_zoo import hub, zoo
from metaformer_zoo.models._baselines import official_url

ZOO_MODELS = zoo.zoo_registered_models()
INTERPOLATIONS = {"bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random"}
NO_WEIGHTS = re.compile(r"\b(weights?|checkpoints?)\b", re.I)  # notes must say where weights are / that none exist


def _tags(arch):
    """(full name, cfg dict) for every pretrained tag of ``arch`` (the untagged default when it has none)."""
    names = timm.list_pretrained(f"{arch}.*") or [arch]
    names += [n for n in timm.models._registry._model_pretrained_cfgs if n.split(".")[0] == arch and n not in names]
    return [(n, timm.models.get_pretrained_cfg(n).to_dict()) for n in dict.fromkeys(names)]


def _family(arch):
    try:
        return zoo.family_of(arch)
    except ValueError:
        return None


def _has_weights(cfg):
    return bool(cfg.get("url") or cfg.get("hf_hub_id") or cfg.get("file"))


def test_zoo_models_found():
    assert {"identityformer_s12", "randformer_m48"} <= set(ZOO_MODELS)
    # timm-owned families are served from timm, never re-registered by the zoo
    assert not {"poolformer_s12", "caformer_s18", "mambaout_femto"} & set(ZOO_MODELS)


@pytest.mark.parametrize("arch", ZOO_MODELS)
def test_default_cfg_fields(arch):
    model = timm.create_model(arch, device="meta")
    state = model.state_dict()
    for name, cfg in _tags(arch):
        in_chans, h, w = cfg["input_size"]
        assert in_chans >= 1 and h > 0 and w > 0, name
        assert 0.0 < float(cfg["crop_pct"]) <= 1.0, name
        assert cfg["interpolation"] in INTERPOLATIONS, name
        assert len(cfg["mean"]) == len(cfg["std"]) == in_chans and all(s > 0 for s in cfg["std"]), name
        assert isinstance(cfg.get("license"), str) and cfg["license"], f"{name}: no license"
        assert cfg.get("num_classes", 0) >= 0
        if cfg.get("test_input_size") is not None:
            assert len(cfg["test_input_size"]) == 3, name
        first = cfg.get("first_conv")
        assert first and f"{first}.weight" in state, f"{name}: first_conv {first!r} is not a parameter"
        classifiers = cfg.get("classifier")
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers or ())
        assert classifiers, f"{name}: no classifier"
        for c in classifiers:
            assert f"{c}.weight" in state, f"{name}: classifier {c!r} is not a parameter"
        if cfg.get("paper_ids"):
            assert re.search(r"\d{4}\.\d{4,5}", cfg["paper_ids"]) or ":" in cfg["paper_ids"], name


@pytest.mark.parametrize("arch", ZOO_MODELS)
def test_official_weights_declared(arch):
    """Weights are declared where they can be fetched (URL / Hub id); otherwise the notes say where they are / that
    there are none. Variants of a family with official code must do one or the other."""
    fam = _family(arch)
    tags = _tags(arch)
    for name, cfg in tags:
        if cfg.get("url"):
            assert cfg["url"].startswith("https://"), f"{name}: url {cfg['url']!r} is not https"
        if cfg.get("hf_hub_id"):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w.-]+)?", cfg["hf_hub_id"]), name
    if fam is None or not fam.code or fam.owner != "zoo":
        return  # generic compositions and paper-only reconstructions have no official weights
    if not any(_has_weights(cfg) for _, cfg in tags):
        notes = " ".join([fam.notes] + [cfg.get("notes") or "" for _, cfg in tags])
        assert NO_WEIGHTS.search(notes), (
            f"{arch}: family {fam.name} has official code ({fam.code}) but declares no weights: add the official URL "
            f"/ Hub id to its default_cfgs, or say in the notes where the weights are (or that there are none)")


def test_known_official_urls():
    for s in ("s12", "s24", "s36", "m36", "m48"):
        for fam in ("identityformer", "randformer"):
            cfg = timm.models.get_pretrained_cfg(f"{fam}_{s}").to_dict()
            assert cfg["url"] == official_url(fam, f"{fam}_{s}")
    assert timm.models.get_pretrained_cfg("randformer_s12").to_dict()["fixed_input_size"] is True


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches, whatever the machine: downloads raise like a missing network would."""
    def no_url(url, *a, **k):
        raise urllib.error.URLError("network disabled by the test")

    def no_hub(*a, **k):
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise LocalEntryNotFoundError("offline: the file is not in the local cache")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_url)
    import timm.models._hub as timm_hub
    monkeypatch.setattr(timm_hub, "hf_hub_download", no_hub)


@pytest.mark.parametrize("arch", [a for a in ZOO_MODELS if any(_has_weights(c) for _, c in _tags(a))])
def test_pretrained_without_network_names_source(arch, offline):
    cfg = timm.models.get_pretrained_cfg(arch).to_dict()
    sources = [cfg[k] for k in ("hf_hub_id", "url") if cfg.get(k)]
    with pytest.raises(Exception) as info:
        timm.create_model(arch, pretrained=True, device="meta")
    msg = str(info.value)
    assert any(s in msg for s in sources), f"{arch}: error does not name {sources}: {msg}"
    assert isinstance(info.value, hub.WeightsUnavailableError) and "local-dir:" in msg


def test_non_fetch_errors_pass_through(offline):
    """A wrong checkpoint given as a file is a CheckpointError (not a download problem) and is not rewrapped."""
    from metaformer_zoo.checkpoint import CheckpointError
    with pytest.raises(CheckpointError):
        hub.convert_checkpoint("identityformer_s12", {"foo.weight": torch.zeros(1)}, depths=(1, 1, 1, 1),
                               dims=(8, 8, 8, 8))
    assert hub.weights_unavailable_error("identityformer_s12", ValueError("x")) is None
    err = hub.weights_unavailable_error("identityformer_s12", urllib.error.URLError("down"))
    assert official_url("identityformer", "identityformer_s12") in str(err)

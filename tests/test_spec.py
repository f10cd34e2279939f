"""The family contract: a family is one ``FamilySpec``; everything a user meets is derived from it.

The toy-family test runs in a subprocess (registering a family changes timm's global registry for the rest of a
process): a module that holds nothing but a spec over the shared skeleton gets timm entrypoints and pretrained tags,
a catalogue row, ``features_only``, the dense backbone with its declared norms, official-checkpoint conversion and a
Hub-folder round trip.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import timm

import metaformer_zoo
from metaformer_zoo import zoo
from metaformer_zoo.spec import FamilySpec, OfficialFormat, Variant, paper_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY = textwrap.dedent('''
    import sys, types, tempfile
    import torch, timm
    import metaformer_zoo
    from metaformer_zoo import MetaFormer, hub, zoo
    from metaformer_zoo.checkpoint import remap_keys, unwrap_state_dict, validate_state_dict
    from metaformer_zoo.dense.core import DenseBackbone
    from metaformer_zoo.spec import FamilySpec, OfficialFormat, Variant

    # a family module: its modules (here the shared skeleton) + one spec
    mod = types.ModuleType("metaformer_zoo.models.toyformer")
    sys.modules[mod.__name__] = mod

    def to_official(model):  # the "official" layout of the toy family renames the stem
        return remap_keys(model.state_dict(), ((r"^stem\\.", "patch_embed."),))

    def filter_fn(sd, model):
        return validate_state_dict(remap_keys(unwrap_state_dict(sd), ((r"^patch_embed\\.", "stem."),)), model)

    mod.SPEC = FamilySpec(
        name="toyformer", model_cls=MetaFormer, paper="Toy", arxiv="2210.13452", code="https://example.org/toy",
        cfg=dict(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0, first_conv="stem.conv",
                 classifier="head.fc"),
        official=OfficialFormat(filter=filter_fn, to_official=to_official, wrapper="model"),
        dense_out_norms=(None, "layernorm2d", None, dict(type="groupnorm", num_groups=1, eps=1e-5)),
        models=(Variant("toyformer_a", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), token_mixers="pooling"),
                        params=None, tags={"in1k": dict(url="https://example.org/toy_a.pth"), "untrained": {}}),
                Variant("toyformer_b", dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), token_mixers="identity"))),
    )
    zoo.register_family(mod.SPEC, mod.__name__)

    # timm: entrypoints and tags, as declared
    assert timm.list_models("toyformer*") == ["toyformer_a", "toyformer_b"]
    assert timm.list_pretrained("toyformer*") == ["toyformer_a.in1k"]  # the tag with weights
    assert timm.models.get_pretrained_cfg("toyformer_a.untrained").url is None  # the second tag, no weights
    assert timm.models.model_entrypoint("toyformer_a").__module__ == mod.__name__
    assert "toyformer_b" in zoo.zoo_registered_models()
    cfg = timm.models.get_pretrained_cfg("toyformer_a")
    assert cfg.url.endswith("toy_a.pth") and cfg.input_size == (3, 64, 64) and cfg.paper_ids == "arXiv:2210.13452"
    m = timm.create_model("toyformer_a", num_classes=5).eval()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    feats = timm.create_model("toyformer_b", features_only=True)(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [8, 16, 24, 32]

    # catalogue row (measured: the toy declares no params)
    info = zoo.variant_info("toyformer_a")
    assert info["family"] == "toyformer" and info["params"] > 0 and info["macs"] > 0 and info["weights"]
    assert zoo.family_of("toyformer_b") is mod.SPEC and zoo.list_families()[-1] is mod.SPEC

    # dense backbone with the declared per-output norms
    b = DenseBackbone("toyformer_a")
    kinds = [type(n).__name__ for n in b.out_norms]
    assert kinds == ["Identity", "LayerNorm2d", "Identity", "GroupNorm"], kinds

    # official checkpoint -> zoo model -> Hub folder -> back, same outputs
    src = timm.create_model("toyformer_a")
    with tempfile.TemporaryDirectory() as d:
        path = d + "/official.pth"
        obj = hub.make_official_checkpoint(src, path, model_name="toyformer_a")
        assert set(obj) == {"model"} and "patch_embed.conv.weight" in obj["model"]
        conv = hub.convert_checkpoint("toyformer_a", path)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(conv(x), src.eval()(x))
        hub.export_folder(conv, d + "/hub", source=path)
        diffs = hub.verify_folder(d + "/hub", conv)
        assert max(diffs.values()) == 0.0, diffs
        again = timm.create_model("toyformer_a", checkpoint_path=path)  # official layout through checkpoint_path=
        with torch.no_grad():
            assert torch.equal(again.eval()(x), src(x))
    print("TOY FAMILY OK")
''')


def test_a_family_is_one_spec():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", TOY], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0 and "TOY FAMILY OK" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]


def test_specs_are_frozen_and_typed():
    fam = zoo.family_of("caformer_s18")
    assert isinstance(fam, FamilySpec) and isinstance(fam.official, OfficialFormat)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fam.name = "x"
    with pytest.raises(TypeError):
        fam.cfg["input_size"] = (3, 1, 1)  # read-only mapping
    assert all(isinstance(v, Variant) for f in zoo.list_families() for v in f.models)


def test_spec_errors():
    with pytest.raises(ValueError, match="declares no variant"):
        FamilySpec("x", ())
    with pytest.raises(ValueError, match="twice"):
        FamilySpec("x", (Variant("a"), Variant("a")), owner="timm")
    with pytest.raises(ValueError, match="needs model_cls"):
        FamilySpec("x", (Variant("a"),))
    with pytest.raises(ValueError, match="already in the zoo catalogue"):
        zoo.register_family(zoo.family_of("caformer_s18"))
    clash = FamilySpec("y", (Variant("caformer_s18"),), owner="timm")
    with pytest.raises(ValueError, match="already in family 'caformer'"):
        zoo.register_family(clash)
    with pytest.raises(ValueError, match="not a caformer variant"):
        zoo.family_of("caformer_s18").variant("caformer_s99")


def test_every_family_declares_its_identity():
    for fam in zoo.list_families():
        assert fam.paper and fam.card, fam.name
        if fam.owner == "timm":
            assert fam.official is not None and fam.citation.startswith("@"), fam.name
        assert set(fam.variants) <= set(timm.list_models()), fam.name


def test_no_family_module_keeps_its_own_tables():
    """The spec is the only declaration: no dead per-family tables or hooks the consumers used to sniff."""
    for fam in zoo.list_families():
        if fam.owner != "zoo":
            continue
        mod = sys.modules[timm.models.model_entrypoint(fam.variants[0]).__module__]
        for attr in ("DENSE_OUT_NORMS", "dense_out_norm", "load_official_checkpoint"):
            assert not hasattr(mod, attr), f"{mod.__name__}.{attr}: declare it in the family spec"
        assert getattr(mod, "SPEC", None) is fam, f"{mod.__name__} declares no SPEC"


assert metaformer_zoo  # imported for its registration side effect


def test_paper_identity_from_bibtex():
    """A spec's paper line, arXiv id and timm paper_name come from its BibTeX; explicit fields win."""
    conf = "@inproceedings{a,\n  title={Strip-MLP: A},\n  booktitle={Proceedings of the IEEE/CVF (ICCV)},\n  year={2023}\n}"
    assert paper_of(conf) == ("Strip-MLP: A", "Strip-MLP: A (ICCV 2023)", "")
    preprint = "@article{b,\n  title   = {{Mixing} and Shifting},\n  journal = {arXiv preprint arXiv:2202.06510},\n" \
               "  year    = {2022}\n}"
    assert paper_of(preprint) == ("Mixing and Shifting", "Mixing and Shifting (arXiv 2022)", "2202.06510")
    eprint = "@misc{c,\n  title = {RaftMLP},\n  year = {2021},\n  eprint = {2108.04384},\n  archivePrefix = {arXiv}\n}"
    assert paper_of(eprint)[1:] == ("RaftMLP (arXiv 2021)", "2108.04384")
    fam = zoo.family_of("msmlp_tiny")
    assert fam.arxiv == "2202.06510" and fam.title == timm.models.get_pretrained_cfg("msmlp_tiny").paper_name
    assert zoo.family_of("transxnet_t").paper.endswith("(IEEE TNNLS 2025)")

"""Strip-MLP: parameter counts / MACs vs the official code, strip grouping vs the official conv formulation,
official-file loading (yacs config, safely), sizes and errors."""
import sys
import types
import zipfile
from collections import OrderedDict

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import metaformer_zoo  # noqa: F401
from helpers import check_params_and_macs, features_only_sizes, perturb
from metaformer_zoo.checkpoint import SAFE_GLOBALS, CheckpointError, load_checkpoint_file, unwrap_state_dict
from metaformer_zoo.dense.core import resolve_out_norms
from metaformer_zoo.hub import convert_checkpoint
from metaformer_zoo.mixers.strip import CGSMM, resize_strip_weight, strip_groups
from metaformer_zoo.models import stripmlp as S
from metaformer_zoo.skeleton import MetaFormerBase
from metaformer_zoo.zoo import family_of

ROOT = Path(__file__).resolve().parents[1]

# measured on the official code (reference/mlp_freq.md §4.1)
OFFICIAL = {
    "stripmlp_light_t": (18_243_920, 2.5186e9),
    "stripmlp_t": (24_903_920, 3.6482e9),
    "stripmlp_s": (42_568_600, 6.8031e9),
    "stripmlp_b": (57_216_480, 9.1849e9),
}
TINY = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_params_and_macs(name):
    check_params_and_macs(name, *OFFICIAL[name])


def test_group_rule():
    # patch = 2 when the block width is a multiple of 80, else 4; G = width / (2 * patch)
    assert [strip_groups(c) for c in (80, 160, 96, 192, 112)] == [20, 40, 12, 24, 14]


def _official_proj_h(x, conv, G):
    """Official ``strip_mlp`` proj_h path, verbatim in plain torch ops (view/permute/grouped conv)."""
    N, C, H, W = x.shape
    C1 = C // G
    t = x.view(N, C1, G, H, W).permute(0, 1, 3, 2, 4).contiguous().view(N, C1, H, G * W)
    t = conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return t.view(N, C1, H, G, W).permute(0, 1, 3, 2, 4).contiguous().view(N, C, H, W)


def _official_proj_w(x, conv, G):
    N, C, H, W = x.shape
    C1 = C // G
    t = conv(x.view(N, C1, H * G, W).permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    return t.contiguous().view(N, C1, G, H, W).view(N, C, H, W)


def test_strips_match_official_conv_formulation():
    torch.manual_seed(0)
    dim, H = 12, 6
    m = CGSMM(dim, (H, H), groups=3).eval()
    x = torch.randn(2, dim, H, H)
    torch.testing.assert_close(m._proj(x, m.proj_h, "w"), _official_proj_h(x, m.proj_h, 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m._proj(x, m.proj_w, "h"), _official_proj_w(x, m.proj_w, 3), rtol=1e-5, atol=1e-5)
    # channel c uses strip matrix c % G: channels 1, 4, 7, 10 share one; an impulse stays in its channel and rows h-1..h+1
    x = torch.zeros(1, dim, H, H)
    x[0, 4, 2, 3] = 1.0
    y = m._proj(x, m.proj_h, "w") - m._proj(torch.zeros_like(x), m.proj_h, "w")
    nz = y.abs() > 0
    assert nz.any(dim=(0, 2, 3)).nonzero().flatten().tolist() == [4]
    assert nz[0, 4].any(dim=1).nonzero().flatten().tolist() == [1, 2, 3]


def test_relative_position_is_toeplitz():
    m = CGSMM(8, (5, 5), groups=2)
    pos = m.relate_pos_h(torch.zeros(1, 8, 5, 7))[0]  # (C, H, W)
    tab = m.relate_pos_h.embeddings_table
    for i in range(5):
        for j in range(7):
            torch.testing.assert_close(pos[:, i, j], tab[max(-5, min(5, j - i)) + 5])


def _install_fake_yacs():
    """A stand-in for yacs.config.CfgNode with yacs' pickling behaviour (a dict subclass with __dict__ flags)."""
    mod = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None):
            super().__init__(init_dict or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    mod.CfgNode = CfgNode
    pkg = types.ModuleType("yacs")
    pkg.config = mod
    sys.modules["yacs"], sys.modules["yacs.config"] = pkg, mod
    return CfgNode


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_official_file_with_yacs_config_loads_safely(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("stripmlp_light_t", **TINY, num_classes=10).eval()
    perturb(src)
    official = S.official_state_dict(src)
    assert "patch_embed.weight" in official and "blocks1.0.token_mixing.smlp_block.proj_h.weight" in official
    assert "merging1.weight" in official and "conv_s1_28.weight" in official and "head.weight" in official
    CfgNode = _install_fake_yacs()
    try:
        cfg = CfgNode({"MODEL": CfgNode({"TYPE": "strip_mlp_layer"}), "DATA": CfgNode({"IMG_SIZE": 224})})
        path = tmp_path / "smlp.pth"
        torch.save({"model": official, "optimizer": {}, "max_accuracy": 81.2, "epoch": 299, "config": cfg}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    # the file pickles the yacs object (plain torch refuses it without the zoo: tests/test_loading.py) ...
    with zipfile.ZipFile(path) as z:
        assert any(b"yacs.config\nCfgNode" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    # ... the one safe reader reads it (CfgNode rebuilt as a plain dict, yacs not needed), the filter loads strictly
    dst = convert_checkpoint("stripmlp_light_t", str(path), **TINY, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    # anything else executable in the file is refused
    bad = tmp_path / "bad.pth"
    torch.save({"model": official, "config": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_checkpoint("stripmlp_light_t", str(bad), **TINY, num_classes=10)


def test_bad_checkpoint_layout():
    model = timm.create_model("stripmlp_light_t", **TINY)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        S.checkpoint_filter_fn({"levels.0.fn.0.fc.weight": torch.zeros(1)}, model)
    sd = S.official_state_dict(model)
    sd.pop("conv_s1_28.weight")
    with pytest.raises(CheckpointError, match="missing"):
        S.checkpoint_filter_fn({"model": sd}, model)


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (224, 320), (200, 296)])
def test_forward_sizes(size):
    torch.manual_seed(0)
    model = timm.create_model("stripmlp_light_t", **TINY, num_classes=5).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (1, 5) and torch.isfinite(out).all()
    for f, s, i in zip(feats, (4, 8, 16, 32), range(4)):
        assert f.shape == (1, 16 * 2 ** i, size[0] // s, size[1] // s)


def test_strip_weight_resampling_exact_at_trained_size_and_strict_error():
    w, b = torch.randn(2, 7, 7, 3), torch.randn(2, 7)
    w2, b2 = resize_strip_weight(w, b, 7)
    assert w2 is w and b2 is b
    w3, b3 = resize_strip_weight(w, b, 14)
    assert w3.shape == (2, 14, 14, 3) and b3.shape == (2, 14)
    model = timm.create_model("stripmlp_light_t", **TINY, strict_size=True).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
        with pytest.raises(ValueError, match="training resolution"):
            model(torch.randn(1, 3, 256, 256))


def test_features_and_composition():
    model = timm.create_model("stripmlp_light_t", **TINY, features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [32, 128]
    # no official dense code: no per-output norm
    assert resolve_out_norms("stripmlp_light_t", (0, 1, 2, 3), TINY["dims"]) == [None] * 4
    zoo = timm.create_model("zoo_metaformer", token_mixers=["strip", "cgsmm", "lsmm", "attention"],
                            depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_classes=3, img_size=64).eval()
    with torch.no_grad():
        assert zoo(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_clear_errors():
    with pytest.raises(ValueError, match="square"):
        timm.create_model("stripmlp_light_t", **TINY, img_size=(224, 320))
    model = timm.create_model("stripmlp_light_t", **TINY).eval()
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 16, 16))


@pytest.mark.slow
def test_full_model_detection_size_slow():
    assert features_only_sizes("stripmlp_light_t", (800, 1216)) == [(200, 304), (100, 152), (50, 76), (25, 38)]


def test_loader_returns_config_as_plain_dict(tmp_path):
    CfgNode = _install_fake_yacs()
    try:
        path = tmp_path / "c.pth"
        torch.save({"model": {"w": torch.ones(2)}, "config": CfgNode({"MODEL": CfgNode({"TYPE": "x"})})}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        obj = torch.load(path, weights_only=True)
    assert type(obj["config"]) is OrderedDict and obj["config"]["MODEL"]["TYPE"] == "x"
    assert unwrap_state_dict(load_checkpoint_file(str(path)))["w"].shape == (2,)


def test_spec_declaration():
    """One FamilySpec: registered names and cfgs derived from it, official numbers, card citation, recipe."""
    spec = family_of("stripmlp_light_t")
    assert spec is S.SPEC and spec.variants == ('stripmlp_light_t', 'stripmlp_t', 'stripmlp_s', 'stripmlp_b')
    assert all(timm.models.model_entrypoint(n).__module__ == S.__name__ for n in spec.variants)
    assert {v.name: v.params for v in spec.models} == {n: p for n, (p, _) in OFFICIAL.items()}
    cfg = timm.models.get_pretrained_cfg("stripmlp_t.in1k").to_dict()
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"], cfg["license"]) == (
        (3, 224, 224), 0.875, "bicubic", "mit")
    assert not cfg.get("url")  # Baidu Pan: not directly downloadable
    assert cfg["origin_url"].startswith("https://pan.baidu.com/")
    assert {f"{n}.in1k" for n in spec.variants} <= set(timm.models._registry._model_pretrained_cfgs)  # the tag
    assert dict(spec.variant("stripmlp_s").kwargs) == dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2))
    assert not hasattr(S, "load_official_checkpoint")
    assert spec.citation and spec.citation in (ROOT / "model_cards" / f"{spec.card}.md").read_text()
    assert (ROOT / "configs" / "train" / f"{spec.recipe}.yaml").is_file()
    assert not hasattr(S, "DENSE_OUT_NORMS") and not hasattr(S, "dense_out_norm")


def test_skeleton_hooks_cross_stage_shortcuts():
    """forward_intermediates is the skeleton's; the cross-stage shortcuts come in through its _forward_stages hook."""
    torch.manual_seed(0)
    model = perturb(timm.create_model("stripmlp_light_t", **TINY, num_classes=3))
    assert type(model).forward_intermediates is MetaFormerBase.forward_intermediates
    assert type(model).group_matcher is MetaFormerBase.group_matcher
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        # a plain chain of the stages (no shortcuts) differs from stage 2 on
        chain = model.stages[1](model.stages[0](model.stem(x)))
        torch.testing.assert_close(feats[1], chain)
        assert not torch.allclose(feats[2], model.stages[2](chain))
        early, (f2,) = model.forward_intermediates(x, indices=[2], stop_early=True)
        torch.testing.assert_close(f2, feats[2])
        torch.testing.assert_close(early, feats[2])


def test_dims_must_nest():
    with pytest.raises(ValueError, match="multiple of dims"):
        timm.create_model("stripmlp_light_t", dims=(16, 32, 48, 96), depths=(1, 1, 1, 1))


def test_cpu_strip_projection_skips_the_op_and_matches_it(monkeypatch):
    """On the reference dispatch (CPU) ``strip_mix_op`` runs the reference formula under autograd (the grouped
    convolution with its own backward, as the official code), not the ``strip_mix`` custom op; values and every
    gradient equal the op's."""
    from metaformer_zoo.mixers import strip as strip_mod
    torch.manual_seed(0)
    mix = CGSMM(8, feat_size=(6, 6), groups=2)
    perturb(mix, seed=1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    calls = []
    real_op = strip_mod.strip_mix
    monkeypatch.setattr(strip_mod, "strip_mix", lambda *a, **k: calls.append(a[3]) or real_op(*a, **k))
    got = mix.eval()(x)
    got_g = torch.autograd.grad(got.square().sum(), [x] + list(mix.parameters()))
    assert calls == []  # the custom op was not called on CPU
    mix.backend = "reference"  # the op computes its reference ...
    monkeypatch.setattr(strip_mod, "resolve_backend", lambda *a, **k: "triton")  # ... but the mixer takes the op path
    want = mix(x)
    want_g = torch.autograd.grad(want.square().sum(), [x] + list(mix.parameters()))
    assert calls == ["w", "h"]
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

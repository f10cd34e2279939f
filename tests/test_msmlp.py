"""MS-MLP (JegZheng/MS-MLP): parameter counts, MACs, the mix-shift op, official checkpoints, input sizes, errors."""
import sys
import types
import zipfile

import pytest
import timm
import torch

import metaformer_zoo  # noqa: F401  (registers the models)
from helpers import check_forward_sizes, perturb
from metaformer_zoo.checkpoint import CheckpointError, load_checkpoint_file
from metaformer_zoo.dense.core import resolve_out_norms
from metaformer_zoo.mixers import create_mixer
from metaformer_zoo.mixers.msmlp import MIX_SIZES, MixShift, chunk_sizes, mix_shift
from metaformer_zoo.models.msmlp import checkpoint_filter_fn, official_state_dict
from metaformer_zoo.zoo import count_macs, count_params, family_of

# measured on the official code (reference/mlp_freq.md section 3.1)
OFFICIAL = {
    "msmlp_tiny": (28_656_232, 4.4378e9),
    "msmlp_small": (50_303_752, 8.6671e9),
    "msmlp_base": (88_696_792, 15.3342e9),
}


# Default tests use MS-MLP-T's widths with one block per stage (same stem, mixers, downsampling and head; the full
# depth only repeats blocks). The full model runs in the slow tests; its parameter count is checked above on meta.
SHALLOW = dict(depths=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("msmlp_tiny", **SHALLOW).eval()
    perturb(model, seed=1)
    return model


@pytest.fixture(scope="module")
def narrow():
    """A narrow MS-MLP (widths 40..320, two blocks in stage 3) for the checkpoint round trips."""
    torch.manual_seed(0)
    model = timm.create_model("msmlp_tiny", dims=(40, 80, 160, 320), depths=(1, 1, 2, 1)).eval()
    perturb(model, seed=1)
    return model


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_param_counts(name):
    model = timm.create_model(name, device="meta")
    assert count_params(model)[0] == OFFICIAL[name][0]
    assert family_of(name).name == "msmlp"


@pytest.mark.parametrize("name", ["msmlp_tiny", pytest.param("msmlp_small", marks=pytest.mark.slow),
                                  pytest.param("msmlp_base", marks=pytest.mark.slow)])
def test_macs(name):
    macs = count_macs(timm.create_model(name, device="meta"), (3, 224, 224), device="meta")
    assert abs(macs / OFFICIAL[name][1] - 1) < 0.01


def test_spec_declares_registry_and_cfgs():
    """One FamilySpec: entrypoints, tags and pretrained cfgs derived from it are the published ones."""
    spec = family_of("msmlp_tiny")
    assert spec.variants == tuple(OFFICIAL) and spec.official.wrapper == "model"
    assert timm.list_pretrained("msmlp*") == ["msmlp_base.in1k", "msmlp_small.in1k", "msmlp_tiny.in1k"]
    for name, (params, macs) in OFFICIAL.items():
        v = spec.variant(name)
        assert v.params == params and abs(v.macs / macs - 1) < 1e-3
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k").to_dict()
        size = name.split("_")[1]
        assert cfg["url"] == (f"https://tsciencescu.blob.core.windows.net/projectshzheng/MSMLP/released_model/"
                              f"msmlp_{size}_patch4/msmlp_{size}_patch4_ckpt_epoch299.pth")
        assert (cfg["input_size"], cfg["pool_size"], cfg["crop_pct"], cfg["interpolation"]) == \
            ((3, 224, 224), (7, 7), 0.875, "bicubic")
        assert (cfg["first_conv"], cfg["classifier"], cfg["license"], cfg["paper_ids"], cfg["origin_url"]) == \
            ("stem.proj", "head.fc", "mit", "arXiv:2202.06510", "https://github.com/JegZheng/MS-MLP")
        assert cfg["paper_name"] == "Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs"
    # widths are per stage (official EMBED_DIM C -> (C, 2C, 4C, 8C)); the old scalar kwarg is gone
    assert [f["num_chs"] for f in timm.create_model("msmlp_base", device="meta").feature_info] == [128, 256, 512, 1024]
    with pytest.raises(TypeError, match="embed_dim"):
        timm.create_model("msmlp_tiny", embed_dim=64, device="meta")


def test_names_do_not_collide_with_timm():
    import importlib
    for name in OFFICIAL:
        assert timm.models.model_entrypoint(name).__module__ == "metaformer_zoo.models.msmlp"
    # the module name is ours alone: no timm model lives in a module called "msmlp"
    assert sorted(timm.list_models(module="msmlp")) == sorted(OFFICIAL)
    assert sorted(importlib.import_module("metaformer_zoo.models.msmlp").default_cfgs) == sorted(OFFICIAL)


# ---------------------------------------------------------------------------------------------------------------------
# the mix-shift op
# ---------------------------------------------------------------------------------------------------------------------
def _formula(x, w, b, s, axis):
    """Independent loop implementation of one branch: roll (circular, torch.roll sign) then zero-padded dw conv.

    out[c, h, w] = b[c] + sum_{i,j} K[c,i,j] * x[c, src], taps with (h+i-p, w+j-p) outside the image contribute 0,
    and src wraps the shifted coordinate: (h+i-p, (w+j-p-s) mod W) for the W branch, ((h+i-p-s) mod H, w+j-p) for H.
    """
    C, H, W = x.shape
    k = w.shape[-1]
    p = k // 2
    out = torch.zeros_like(x)
    for c in range(C):
        for h in range(H):
            for ww in range(W):
                acc = float(b[c].detach())
                for i in range(k):
                    for j in range(k):
                        hh, wj = h + i - p, ww + j - p
                        if not (0 <= hh < H and 0 <= wj < W):
                            continue
                        src = (hh, (wj - s) % W) if axis == "w" else ((hh - s) % H, wj)
                        acc += float(w[c, 0, i, j].detach()) * float(x[c, src[0], src[1]])
                out[c, h, ww] = acc
    return out


def _expected(mixer, x):
    outs = []
    start = 0
    for g, c in enumerate(mixer.chunk_sizes):
        xg = x[0, start:start + c].double()
        s = mixer.shift_dist[g]
        lr, td = mixer.dwconv_lr[g], mixer.dwconv_td[g]
        outs.append(_formula(xg, lr.weight.double(), lr.bias.double(), s, "w")
                    + _formula(xg, td.weight.double(), td.bias.double(), s, "h"))
        start += c
    return torch.cat(outs, 0)


def test_mix_shift_impulse_matches_formula():
    torch.manual_seed(0)
    # 5 groups of 2 channels, kernels (1, 3, 3, 5, 7) and shifts (-2..2) on a 5x6 map: the 7x7 kernel is larger
    # than the map and the shifts wrap around
    mixer = MixShift(10, mix_size=(1, 3, 3, 5, 7)).double()
    H, W = 5, 6
    for c, h0, w0 in [(0, 2, 3), (3, 0, 5), (5, 4, 0), (8, 1, 1), (9, 4, 5)]:
        x = torch.zeros(1, 10, H, W, dtype=torch.float64)
        x[0, c, h0, w0] = 1.0
        with torch.no_grad():
            got = mixer(x)[0]
        torch.testing.assert_close(got, _expected(mixer, x), rtol=0, atol=1e-12)
        # the impulse only reaches its own channel (beyond the biases): depthwise, no channel mixing
        bias = torch.cat([(lr.bias + td.bias) for lr, td in zip(mixer.dwconv_lr, mixer.dwconv_td)]).detach()
        delta = (got - bias[:, None, None]).abs().sum((1, 2))
        assert delta[c] > 0 and torch.count_nonzero(delta > 1e-12) == 1


def test_mix_shift_wrap_then_zero_pad():
    """A shift of +2 on a 3-wide map with a 1x1 kernel is a pure circular roll: the value wraps, nothing is lost."""
    w = torch.ones(1, 1, 1, 1)
    b = torch.zeros(1)
    x = torch.arange(3.).reshape(1, 1, 1, 3)
    y = mix_shift(x, [w], [b], [w], [b], [1], [2], [1])
    # lr: roll along W by 2 -> [1, 2, 0]; td: roll along H (size 1) is the identity -> [0, 1, 2]
    torch.testing.assert_close(y, torch.tensor([[[[1., 3., 2.]]]]))
    # 3x3 kernel of ones on a 1x3 map, shift +1: rolled [2, 0, 1], zero-padded box sum -> [2, 3, 1]
    w3 = torch.ones(1, 1, 3, 3)
    y = mix_shift(x, [w3], [b], [torch.zeros_like(w3)], [b], [3], [1], [1])
    torch.testing.assert_close(y, torch.tensor([[[[2., 3., 1.]]]]))


def test_mix_shift_random_input_matches_formula():
    torch.manual_seed(1)
    mixer = MixShift(7, shift_groups=3, shift_dist=(-1, 0, 2), mix_size=(3, 1, 5)).double()
    x = torch.randn(1, 7, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x)[0], _expected(mixer, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim, sizes", [
    (96, [20, 20, 20, 20, 16]), (192, [39, 39, 39, 39, 36]), (384, [77, 77, 77, 77, 76]),
    (768, [154, 154, 154, 154, 152]), (128, [26, 26, 26, 26, 24]), (1024, [205, 205, 205, 205, 204]),
])
def test_chunk_sizes_follow_torch_chunk(dim, sizes):
    assert chunk_sizes(dim, 5) == sizes == [t.shape[0] for t in torch.chunk(torch.zeros(dim), 5)]


def test_mixer_errors_and_registry():
    with pytest.raises(ValueError, match="torch.chunk gives 3 chunks"):
        MixShift(6)
    with pytest.raises(ValueError, match="odd"):
        MixShift(10, mix_size=(1, 2, 3, 5, 7))
    with pytest.raises(ValueError, match="needs 5 shift distances"):
        MixShift(10, shift_dist=(0, 1))
    # the skeleton's stage context picks the official per-stage kernel sizes
    for stage in range(4):
        m = create_mixer("mixshift", 64, context=dict(stage_idx=stage, feat_size=(8, 8), block_idx=0, proj_drop=0.))
        assert m.kernel_sizes == list(MIX_SIZES[stage])


def test_mixshift_composes_in_zoo_metaformer():
    torch.manual_seed(0)
    model = timm.create_model("zoo_metaformer", depths=(1, 1, 1, 1), dims=(40, 80, 160, 320),
                              token_mixers=["identity", "mixshift", "mixshift", "attention"]).eval()
    mixer = model.stages[2].blocks[0].token_mixer
    assert isinstance(mixer, MixShift) and mixer.kernel_sizes == list(MIX_SIZES[2])
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------------
# official checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def _install_fake_yacs():
    """A stand-in for yacs.config.CfgNode that pickles like the real one (dict subclass + __dict__ flags)."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        IMMUTABLE, NEW_ALLOWED = "__immutable__", "__new_allowed__"

        def __init__(self, init_dict=None, key_list=None, new_allowed=False):
            super().__init__(init_dict or {})
            self.__dict__[CfgNode.IMMUTABLE] = False
            self.__dict__[CfgNode.NEW_ALLOWED] = new_allowed

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            self[name] = value

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    sys.modules["yacs"], sys.modules["yacs.config"] = yacs, config
    return CfgNode


def _write_official_file(path, state_dict):
    """An official-format training checkpoint (utils.save_checkpoint) with a yacs config, written with a fake yacs."""
    CN = _install_fake_yacs()
    try:
        cfg = CN()
        cfg.MODEL = CN()
        cfg.MODEL.NAME = "ms_mlp_tiny_patch4_shift5_224"
        cfg.MODEL.MSMLP = CN()
        cfg.MODEL.MSMLP.DEPTHS = [3, 3, 9, 3]
        cfg.MODEL.MSMLP.MIX_SIZE = [list(m) for m in MIX_SIZES]
        cfg.TRAIN = CN()
        cfg.TRAIN.OPTIMIZER = CN()
        cfg.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
        cfg.DATA = CN({"IMG_SIZE": 224})
        cfg.__dict__["__immutable__"] = True  # config.freeze()
        torch.save({
            "model": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-6, "params": [0, 1]}]},
            "lr_scheduler": {"t_initial": 300, "base_values": [5e-4]}, "max_accuracy": 82.1, "epoch": 299,
            "config": cfg,
        }, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def test_official_key_layout():
    """The inverse mapping gives the official key set (506 keys for MS-MLP-T, reference section 3.4)."""
    keys = set(official_state_dict(timm.create_model("msmlp_tiny", device="meta")))
    assert len(keys) == 506
    for k in ("patch_embed.proj.weight", "patch_embed.norm.bias", "layers.0.blocks.2.gamma",
              "layers.0.blocks.0.dwconv_lr.0.weight", "layers.3.blocks.2.dwconv_td.4.bias",
              "layers.2.blocks.8.norm.weight", "layers.2.blocks.8.pwconv1.weight", "layers.1.blocks.0.pwconv2.bias",
              "layers.0.downsample.proj.weight", "layers.2.downsample.norm.weight", "norm.weight", "head.bias"):
        assert k in keys, k
    assert not any(k.startswith("layers.3.downsample") for k in keys)


def test_official_checkpoint_safe_load_filter_strict(narrow, tmp_path):
    tiny = narrow
    path = str(tmp_path / "msmlp_tiny_patch4_ckpt_epoch299.pth")
    official = official_state_dict(tiny)
    assert "layers.0.blocks.0.dwconv_lr.4.weight" in official and "layers.2.downsample.proj.weight" in official
    assert "patch_embed.norm.weight" in official and "head.weight" in official and "norm.bias" in official
    _write_official_file(path, official)
    assert "yacs" not in sys.modules
    with zipfile.ZipFile(path) as z:  # the file pickles a yacs CfgNode (plain torch refuses it: tests/test_loading.py)
        assert any(b"yacs.config\nCfgNode" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))

    ckpt = load_checkpoint_file(path)
    assert "yacs" not in sys.modules  # nothing imported yacs (or any stand-in) behind our back
    cfg = ckpt["config"]
    assert type(cfg) is dict and type(cfg["MODEL"]["MSMLP"]) is dict
    assert cfg["MODEL"]["MSMLP"]["DEPTHS"] == [3, 3, 9, 3] and cfg["TRAIN"]["OPTIMIZER"]["BETAS"] == (0.9, 0.999)
    assert ckpt["epoch"] == 299

    fresh = timm.create_model("msmlp_tiny", dims=(40, 80, 160, 320), depths=(1, 1, 2, 1)).eval()
    fresh.load_state_dict(checkpoint_filter_fn(ckpt, fresh), strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tiny(x), rtol=0, atol=0)

    # timm's pretrained path (custom_load -> MSMLP.load_pretrained), with a re-sized classifier
    m10 = timm.create_model("msmlp_tiny", dims=(40, 80, 160, 320), depths=(1, 1, 2, 1), pretrained=True, num_classes=10,
                            pretrained_cfg_overlay=dict(file=path, custom_load=True)).eval()
    torch.testing.assert_close(m10.stages[2].blocks[1].mlp.fc2.weight, tiny.stages[2].blocks[1].mlp.fc2.weight)
    with torch.no_grad():
        torch.testing.assert_close(m10.forward_head(m10.forward_features(x), pre_logits=True),
                                   tiny.forward_head(tiny.forward_features(x), pre_logits=True))


class _Evil:
    def __reduce__(self):
        return (print, ("PWNED",))


def test_loader_never_runs_foreign_pickles(tmp_path, capsys):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"x": torch.ones(1)}, "config": _Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint_file(path)
    assert "PWNED" not in capsys.readouterr().out


def test_checkpoint_errors():
    tiny = timm.create_model("msmlp_tiny", device="meta")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        checkpoint_filter_fn({"stem.conv.weight": torch.zeros(1)}, tiny)
    small = timm.create_model("msmlp_small", device="meta")
    sd = {k: torch.empty(v.shape, device="meta") for k, v in official_state_dict(small).items()}
    with pytest.raises(CheckpointError, match="unexpected key"):
        checkpoint_filter_fn({"model": sd}, tiny)  # a small checkpoint into tiny: 18 stage-3 blocks too many
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file("/nonexistent/msmlp.pth")


# ---------------------------------------------------------------------------------------------------------------------
# input sizes, features, errors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(224, 224), (256, 256), (224, 320)])
def test_forward_sizes(tiny, size):
    # the sizes are multiples of 32: every map is exactly H / r x W / r
    check_forward_sizes(tiny, size, channels=(96, 192, 384, 768))


def test_features_only_and_dense_norms():
    model = timm.create_model("msmlp_tiny", features_only=True, out_indices=(1, 3), **SHALLOW).eval()
    assert model.feature_info.reduction() == [8, 32] and model.feature_info.channels() == [192, 768]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 12, 8), (1, 768, 3, 2)]
    # dense adapter: a channel LayerNorm (eps 1e-6) on each of the 4 outputs, declared as data in the spec
    norms = resolve_out_norms("msmlp_tiny", (0, 1, 2, 3), (96, 192, 384, 768))
    assert all(type(n) is timm.layers.LayerNorm2d and n.eps == 1e-6 for n in norms)
    assert [n.normalized_shape[0] for n in norms] == [96, 192, 384, 768]
    y = norms[2](torch.randn(2, 384, 5, 7) * 3 + 1)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (256, 256), (224, 320), (800, 1216)])
def test_full_tiny_forward_sizes(size):
    model = timm.create_model("msmlp_tiny").eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        out = model.forward_head(final)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    assert [tuple(f.shape[-2:]) for f in feats] == [(size[0] // r, size[1] // r) for r in (4, 8, 16, 32)]


def test_clear_input_errors(tiny):
    with pytest.raises(ValueError, match="in_chans=1"):
        tiny(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        tiny(torch.randn(1, 3, 16, 64))


def test_block_is_official_single_residual(tiny):
    """gamma = 0 turns every block into the identity (no residual outside the gamma-scaled branch)."""
    block = tiny.stages[0].blocks[0]
    x = torch.randn(1, 96, 8, 8)
    with torch.no_grad():
        saved = block.gamma.clone()
        block.gamma.zero_()
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
        block.gamma.copy_(saved)
    assert "stages.0.blocks.0.gamma" in tiny.no_weight_decay()

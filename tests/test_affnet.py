"""AFFNet: sizes against the official code, the AFF mixer against an explicit DFT, checkpoints, input sizes."""
import math
from pathlib import Path

import pytest
import timm
import torch

import metaformer_zoo  # noqa: F401
from helpers import check_input_errors, check_skeleton_hooks, features_only_sizes, perturb
from metaformer_zoo.checkpoint import CheckpointError
from metaformer_zoo.dense.core import resolve_out_norms
from metaformer_zoo.mixers.affnet import AFFMixer
from metaformer_zoo.models import affnet as A
from metaformer_zoo.models.affnet import checkpoint_filter_fn, official_state_dict
from metaformer_zoo.zoo import count_macs, count_params, family_of

ROOT = Path(__file__).resolve().parents[1]

# measured on microsoft/TokenMixers (reference/mlp_freq.md §1.4): params, MACs at 256 and 224 (FFT not counted)
OFFICIAL = {
    "affnet": (5_568_696, 1.4537e9, 1.1130e9),
    "affnet_t": (2_654_232, 0.7865e9, 0.6023e9),
    "affnet_et": (1_436_264, 0.3562e9, 0.2728e9),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_params_and_macs(name):
    params, macs256, macs224 = OFFICIAL[name]
    model = timm.create_model(name, device="meta")
    assert count_params(model) == (params, params)
    assert model.pretrained_cfg["input_size"] == (3, 256, 256)
    assert abs(count_macs(model, (3, 256, 256), device="meta") / macs256 - 1) < 0.01
    assert abs(count_macs(model, (3, 224, 224), device="meta") / macs224 - 1) < 0.01


def test_catalogue():
    fam = family_of("affnet_t")
    assert fam.name == "affnet" and set(fam.variants) == set(OFFICIAL)
    assert fam.official.filter is checkpoint_filter_fn and fam.official.to_official is official_state_dict
    # no per-output norm for the dense adapter (the official dense heads take the raw end points)
    assert resolve_out_norms("affnet_t", (0, 1, 2, 3), (48, 96, 160, 192)) == [None] * 4


def _explicit_aff(x, w1, b1, w2, b2, G, lam):
    """AFF filter from explicit DFT sums in float64 (no torch.fft): half spectrum, MLP, mask, c2r synthesis."""
    B, C, H, W = x.shape
    Wf = W // 2 + 1
    h = torch.arange(H, dtype=torch.float64)
    w = torch.arange(W, dtype=torch.float64)
    f = torch.arange(Wf, dtype=torch.float64)
    # E[k, f, h, w] = exp(-2 pi i (k h / H + f w / W)) / sqrt(HW)
    phase = 2 * math.pi * (h[:, None, None, None] * h[None, None, :, None] / H
                           + f[None, :, None, None] * w[None, None, None, :] / W)
    E = torch.polar(torch.ones_like(phase), -phase) / math.sqrt(H * W)
    X = torch.einsum("kfhw,bchw->bckf", E, x.to(torch.complex128))
    bs = C // G
    Xg = X.reshape(B, G, bs, H, Wf)
    W1 = torch.complex(w1[0], w1[1])
    W2 = torch.complex(w2[0], w2[1])
    pre = torch.einsum("bgikf,gio->bgokf", Xg, W1) + torch.complex(b1[0], b1[1])[None, :, :, None, None]
    o1 = torch.complex(torch.nn.functional.silu(pre.real), torch.nn.functional.silu(pre.imag))
    o2 = torch.einsum("bgikf,gio->bgokf", o1, W2) + torch.complex(b2[0], b2[1])[None, :, :, None, None]
    shrink = lambda t: torch.sign(t) * torch.clamp(t.abs() - lam, min=0)  # noqa: E731
    M = torch.complex(shrink(o2.real), shrink(o2.imag))
    Y = (M * Xg).reshape(B, C, H, Wf)
    # c2r synthesis: y = sum_k sum_f c_f Re(Y[k, f] e^{+i...}) / sqrt(HW); c_f = 1 (DC, Nyquist) else 2
    c = torch.full((Wf,), 2.0, dtype=torch.float64)
    c[0] = 1
    if W % 2 == 0:
        c[-1] = 1
    y = torch.einsum("kfhw,bckf->bchw", E.conj() * c[None, :, None, None], Y).real
    return y


@pytest.mark.parametrize("hw", [(5, 7), (6, 8), (4, 1)])
def test_aff_mixer_matches_explicit_dft(hw):
    torch.manual_seed(0)
    m = AFFMixer(16, backend="reference").double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20)  # O(0.4) weights so the MLP and softshrink are exercised
    x = torch.randn(2, 16, *hw, dtype=torch.float64)
    want = x + _explicit_aff(x, m.w1, m.b1, m.w2, m.b2, 8, 0.01)
    torch.testing.assert_close(m(x), want, atol=1e-10, rtol=1e-10)
    m.inner_skip = False
    torch.testing.assert_close(m(x), want - x, atol=1e-10, rtol=1e-10)


def test_official_checkpoint_roundtrip():
    torch.manual_seed(0)
    src = timm.create_model("affnet_et").eval()
    perturb(src, seed=1)
    official = official_state_dict(src)
    assert len(official) == 416
    for key in ("conv_1.block.conv.weight", "layer_1.0.block.exp_1x1.block.conv.weight",
                "layer_2.2.block.red_1x1.block.norm.running_var", "layer_3.0.block.conv_3x3.block.conv.weight",
                "layer_4.1.global_rep.3.filter.w1", "layer_4.1.global_rep.4.weight",
                "layer_5.1.global_rep.0.mlp.block.exp_1x1.block.norm.bias", "layer_5.1.conv_proj.block.conv.weight",
                "layer_5.1.fusion.block.norm.weight", "conv_1x1_exp.block.conv.weight", "classifier.fc.bias"):
        assert key in official, key
    assert official["layer_3.1.global_rep.0.filter.w1"].shape == (2, 8, 8, 8)
    dst = timm.create_model("affnet_et").eval()
    # cvnets checkpoint.pt wrapper and the flat *_best.pt form both convert
    dst.load_state_dict(checkpoint_filter_fn({"model_state_dict": official, "epoch": 3}, dst), strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    assert checkpoint_filter_fn(dict(src.state_dict()), dst).keys() == src.state_dict().keys()  # zoo layout passes


def test_checkpoint_errors():
    model = timm.create_model("affnet_et", device="meta")
    other = official_state_dict(timm.create_model("affnet_t", device="meta"))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        checkpoint_filter_fn(other, model)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        checkpoint_filter_fn({"stages.0.0.weight": torch.zeros(1)}, model)
    bad = official_state_dict(model)
    bad.pop("layer_4.1.global_rep.2.filter.b2")
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint_filter_fn(bad, model)


def test_input_sizes_and_features():
    torch.manual_seed(0)
    model = timm.create_model("affnet_et").eval()
    with torch.no_grad():
        for hw in [(224, 224), (256, 256), (224, 320)]:
            x = torch.randn(1, 3, *hw)
            assert model(x).shape == (1, 1000)
        final, inter = model.forward_intermediates(torch.randn(1, 3, 97, 131))  # odd sizes round up
    assert final.shape == (1, 576, 4, 5)
    assert [tuple(t.shape[1:]) for t in inter] == [(48, 25, 33), (64, 13, 17), (104, 7, 9), (144, 4, 5)]
    fm = timm.create_model("affnet_et", features_only=True).eval()
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    assert fm.feature_info.channels() == [48, 64, 104, 144]
    check_input_errors(model)


@pytest.mark.slow
def test_detection_size():
    assert features_only_sizes("affnet_et", (800, 1216)) == [(200, 304), (100, 152), (50, 76), (25, 38)]


def test_block_norm_and_act_switches():
    torch.manual_seed(0)
    a = timm.create_model("affnet_et", block_norm="layer_norm_2d").eval()
    b = timm.create_model("affnet_et", block_norm="layer_norm", act_layer="relu").eval()
    assert count_params(a) == count_params(b)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
    assert b.stages[1].blocks[0].global_rep[0].token_mixer.act == "relu"
    with pytest.raises(ValueError, match="block_norm"):
        timm.create_model("affnet_et", block_norm="batchnorm", device="meta")


def test_aff_mixer_in_zoo_metaformer():
    torch.manual_seed(0)
    model = timm.create_model("zoo_metaformer", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                              token_mixers=["sepconv", "aff", "aff", "attention"],
                              mixer_kwargs=[None, dict(inner_skip=False), None, None]).eval()
    assert isinstance(model.stages[1].blocks[0].token_mixer, AFFMixer)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
    model.train()
    model(x).mean().backward()
    assert model.stages[2].blocks[0].token_mixer.w1.grad is not None


def test_aff_mixer_compiles_without_graph_breaks():
    torch.manual_seed(0)
    m = AFFMixer(16)
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, m(x))
    assert x.grad is not None and x.grad.shape == x.shape


def test_spec_declaration():
    """One FamilySpec: registered names and cfgs derived from it, official numbers, card citation, recipe."""
    spec = family_of("affnet")
    assert spec is A.SPEC and spec.variants == ("affnet", "affnet_t", "affnet_et")
    assert all(timm.models.model_entrypoint(n).__module__ == A.__name__ for n in spec.variants)
    assert {v.name: v.params for v in spec.models} == {n: p for n, (p, _, _) in OFFICIAL.items()}
    cfg = timm.models.get_pretrained_cfg("affnet_t").to_dict()
    assert (cfg["input_size"], cfg["crop_pct"], cfg["mean"], cfg["std"], cfg["license"], cfg["paper_ids"]) == (
        (3, 256, 256), 0.888, (0., 0., 0.), (1., 1., 1.), "mit", "arXiv:2307.14008")
    assert spec.citation and spec.citation in (ROOT / "model_cards" / f"{spec.card}.md").read_text()
    assert (ROOT / "configs" / "train" / f"{spec.recipe}.yaml").is_file()
    assert not hasattr(A, "DENSE_OUT_NORMS") and not hasattr(A, "dense_out_norm")


def test_skeleton_hooks_final_conv():
    """forward_intermediates / group_matcher are the skeleton's; the 1x1 expansion comes in through its hooks."""
    model = timm.create_model("affnet_et", num_classes=3).eval()
    assert model.group_matcher()["blocks"][-1] == (r"^final_conv", (99999,))
    x = torch.randn(1, 3, 64, 64)
    final, inter = check_skeleton_hooks(model, x)
    with torch.no_grad():
        assert final.shape[1] == 576 and inter[-1].shape[1] == 144
        early, inter1 = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(inter1[0], inter[1])
        torch.testing.assert_close(early, inter[1])  # stopped before the last stage: no expansion

"""RaftMLP: parameter counts / MACs vs the official code, raft channel grouping, checkpoint conversion, sizes."""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import metaformer_zoo  # noqa: F401
from helpers import (ceil_sizes, check_forward_sizes, check_params_and_macs, check_skeleton_hooks,
                     features_only_sizes, perturb)
from metaformer_zoo.checkpoint import CheckpointError
from metaformer_zoo.dense.core import resolve_out_norms
from metaformer_zoo.hub import convert_checkpoint
import metaformer_zoo.mixers.raft as raft_mod
from metaformer_zoo.mixers.raft import RaftTokenMLP, raft_ln_from_official, raft_ln_to_official
from metaformer_zoo.models import raftmlp as R
from metaformer_zoo.zoo import family_of

ROOT = Path(__file__).resolve().parents[1]

# measured on the official code (reference/mlp_freq.md §2.1)
OFFICIAL = {
    "raftmlp_s": (9_868_768, 2.0870e9),
    "raftmlp_m": (21_413_632, 4.2673e9),
    "raftmlp_l": (36_184_672, 6.5440e9),
}
TINY = dict(dims=(16, 32, 32, 64), depths=(1, 1, 2, 1))

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_params_and_macs(name):
    check_params_and_macs(name, *OFFICIAL[name])


def test_ln_permutation():
    # official LN index j = co * r + chw belongs to channel chw * C/r + co (C = 8, r = 2: j -> [0, 4, 1, 5, 2, 6, 3, 7])
    w_off = torch.arange(8.)
    channel_of_j = [0, 4, 1, 5, 2, 6, 3, 7]
    w_nat = raft_ln_from_official(w_off, 2)
    for j, c in enumerate(channel_of_j):
        assert w_nat[c] == w_off[j]
    torch.testing.assert_close(raft_ln_to_official(w_nat, 2), w_off)


def _official_vertical(x, ln_w, ln_b, fc1, fc2, r):
    """The official PermutedBlock(vertical) MLP branch written with reshapes (einops patterns spelled out):
    tokens 'b (h w) (chw co)' -> LN on '(co chw)' order -> 'b (co w) (chw h)' -> Linear -> GELU -> Linear -> back."""
    B, C, H, W = x.shape
    M = C // r
    t = x.permute(0, 2, 3, 1).reshape(B, H * W, r, M)  # (chw co)
    t_ln = t.transpose(2, 3).reshape(B, H * W, C)  # (co chw): the order the official LN sees
    t_ln = F.layer_norm(t_ln, (C,), ln_w, ln_b).reshape(B, H * W, M, r).transpose(2, 3)  # back to (chw co)
    rows = t_ln.reshape(B, H, W, r, M).permute(0, 4, 2, 3, 1).reshape(B, M * W, r * H)  # b (co w) (chw h)
    y = fc2(F.gelu(fc1(rows)))
    y = y.reshape(B, M, W, r, H).permute(0, 3, 1, 4, 2).reshape(B, C, H, W)  # channel chw * M + co
    return y


def test_raft_grouping_matches_official_layout():
    torch.manual_seed(0)
    C, r, H, W = 8, 2, 5, 3
    x = torch.randn(2, C, H, W)
    mix = RaftTokenMLP(C, H, raft_size=r, expansion=2, axis="h")
    ln_w_off, ln_b_off = torch.randn(C), torch.randn(C)
    with torch.no_grad():
        mix.norm.weight.copy_(raft_ln_from_official(ln_w_off, r))
        mix.norm.bias.copy_(raft_ln_from_official(ln_b_off, r))
    ref = _official_vertical(x, ln_w_off, ln_b_off, mix.fc1, mix.fc2, r)
    torch.testing.assert_close(mix(x), ref, rtol=1e-5, atol=1e-5)
    # a raft is the strided channel set {co, co + C/r}: perturbing channel 1 only changes channels 1 and 5
    mix.norm = torch.nn.Identity()
    x2 = x.clone()
    x2[:, 1] += 1.0
    changed = (mix(x2) - mix(x)).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.nonzero().flatten().tolist() == [1, 1 + C // r]


def test_official_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("raftmlp_s", **TINY, num_classes=10).eval()
    perturb(src)  # make LN weights non-trivial so the permutation matters
    official = R.official_state_dict(src)
    assert "levels.0.fn.0.fc.weight" in official and official["levels.0.fn.0.fc.weight"].shape == (16, 3 * (16 + 64))
    assert "levels.0.fn.2.1.norm.1.weight" in official and "heads.0.1.weight" in official
    path = tmp_path / "last_model_0.pt"
    torch.save(official, path)
    # the one safe reader + the family's filter (what every loading path uses)
    dst = convert_checkpoint("raftmlp_s", str(path), **TINY, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    # the pretrained path of timm goes through the same filter
    dst2 = timm.create_model("raftmlp_s", **TINY, num_classes=10, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    with torch.no_grad():
        torch.testing.assert_close(dst2(x), src(x))


def test_bad_checkpoints_raise():
    model = timm.create_model("raftmlp_s", **TINY)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        R.checkpoint_filter_fn({"foo.weight": torch.zeros(1)}, model)
    official = R.official_state_dict(model)
    official["levels.0.fn.99.1.fn.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="does not have"):
        R.checkpoint_filter_fn(official, model)
    other = R.official_state_dict(timm.create_model("raftmlp_s", dims=(16, 32, 32, 48), depths=(1, 1, 2, 1)))
    with pytest.raises(CheckpointError):
        R.checkpoint_filter_fn(other, model)


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (224, 320), (230, 250)])
def test_forward_sizes(size):
    torch.manual_seed(0)
    model = timm.create_model("raftmlp_s", **TINY, num_classes=5).eval()
    check_forward_sizes(model, size, num_classes=5, channels=TINY["dims"])


def test_stride4_feature_is_pre_block_embedding():
    torch.manual_seed(0)
    model = timm.create_model("raftmlp_s", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(feats[0], model.stem(x))
        torch.testing.assert_close(feats[1], model.stages[1](model.stages[0](model.stem(x))))
    fmodel = timm.create_model("raftmlp_s", **TINY, features_only=True, out_indices=(0, 2)).eval()
    fmodel.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, strict=False)
    assert fmodel.feature_info.reduction() == [4, 16]
    # the official dense wrappers return the raw maps: no per-output norm
    assert resolve_out_norms("raftmlp_s", (0, 1, 2, 3), TINY["dims"]) == [None] * 4


def test_zoo_metaformer_composes_raft():
    model = timm.create_model("zoo_metaformer", token_mixers=["pooling", "raft", "raft", "attention"],
                              depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_classes=3, img_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
        assert model(torch.randn(1, 3, 96, 64)).shape == (1, 3)  # other sizes resample to the built grid


def test_clear_errors():
    model = timm.create_model("raftmlp_s", **TINY).eval()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by raft_size"):
        RaftTokenMLP(9, 4, raft_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (800, 1216)])
def test_full_model_sizes_slow(size):
    assert features_only_sizes("raftmlp_s", size) == ceil_sizes(size)


def test_spec_declaration():
    """One FamilySpec: registered names and cfgs derived from it, official numbers, card citation, recipe."""
    spec = family_of("raftmlp_s")
    assert spec is R.SPEC and spec.variants == ('raftmlp_s', 'raftmlp_m', 'raftmlp_l')
    assert all(timm.models.model_entrypoint(n).__module__ == R.__name__ for n in spec.variants)
    assert {v.name: v.params for v in spec.models} == {n: p for n, (p, _) in OFFICIAL.items()}
    cfg = timm.models.get_pretrained_cfg("raftmlp_m").to_dict()
    assert (cfg["input_size"], cfg["crop_pct"], cfg["interpolation"], cfg["license"], cfg["paper_ids"]) == (
        (3, 224, 224), 0.875, "bilinear", "apache-2.0", "arXiv:2108.04384")
    assert all(v.kwargs["drop_path_rate"] == 0.1 for v in spec.models)  # constant 0.1, official recipe
    assert spec.citation and spec.citation in (ROOT / "model_cards" / f"{spec.card}.md").read_text()
    assert (ROOT / "configs" / "train" / f"{spec.recipe}.yaml").is_file()
    assert not hasattr(R, "DENSE_OUT_NORMS") and not hasattr(R, "dense_out_norm")


def test_skeleton_hooks_stem_feature():
    """forward_intermediates / group_matcher are the skeleton's; output 0 is the stem output (stem_is_first_feature)."""
    torch.manual_seed(0)
    model = timm.create_model("raftmlp_s", **TINY, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    _, feats = check_skeleton_hooks(model, x)
    with torch.no_grad():
        early, (f0, f2) = model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        torch.testing.assert_close(f0, model.stem(x))
        torch.testing.assert_close(f2, feats[2])
        torch.testing.assert_close(early, feats[2])


def test_cpu_mixing_skips_the_op_and_matches_it(monkeypatch):
    """On CPU (reference dispatch) the raft mixing runs as plain NHWC linears, not through the ``strip_mix`` op
    wrapper (slower on CPU than the official code), and gives the op's values and gradients."""
    torch.manual_seed(0)
    mix = raft_mod.RaftTokenMixing(16, (6, 5), raft_size=2, token_expansion=2)
    for p in mix.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    want = mix._forward_op(x)
    want_g = torch.autograd.grad(want.square().sum(), [x] + list(mix.parameters()))

    def no_op(*args, **kwargs):
        raise AssertionError("strip_mix op called on the CPU reference path")

    monkeypatch.setattr(raft_mod, "strip_mix_op", no_op)
    got = mix(x)
    assert got.is_contiguous(memory_format=torch.channels_last)  # NHWC inside, no NCHW copies
    got_g = torch.autograd.grad(got.square().sum(), [x] + list(mix.parameters()))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # other sizes: resampled to the built grid and back, same on both paths
    x2 = torch.randn(1, 16, 9, 4)
    monkeypatch.undo()
    want2 = raft_mod.resample_like(mix._forward_op(raft_mod.resample_to(x2, mix.grid)), x2)
    torch.testing.assert_close(mix(x2), want2)

"""metaformer_zoo.analysis.mixing_matrix: exact for linear mixers (matrices built by hand), equal to the brute-force
channel-averaged Jacobian for nonlinear ones, found inside zoo / timm / bespoke models; tools/mixing_matrix.py."""
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, SepConv
from timm.models.metaformer import MetaFormer as TimmMetaFormer

import metaformer_zoo  # noqa: F401
from helpers import load_script
from metaformer_zoo import zoo
from metaformer_zoo.analysis import find_token_mixer, mixing_analysis, mixing_matrix, receptive_field
from metaformer_zoo.kernels.strip_mix import strip_mix
from metaformer_zoo.mixers import create_mixer, list_mixers

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def brute_force(mixer, x):
    """(same-channel mean, cross-channel RMS) from the full autograd Jacobian of one (1, C, H, W) sample."""
    C, H, W = x.shape[1:]
    L = H * W
    with torch.no_grad():
        J = torch.autograd.functional.jacobian(lambda t: mixer(t.reshape(1, C, H, W)).reshape(C, L), x.reshape(C, L))
    J = J.reshape(C, L, C, L).permute(0, 2, 1, 3)  # [c, c', i, j]
    eye = torch.eye(C, dtype=torch.bool)
    same = J[eye].mean(0)
    cross = J[~eye].square().mean(0).sqrt()
    return same, cross


def test_identity_is_the_identity_matrix():
    x = torch.randn(1, 6, 3, 4)
    M = mixing_matrix(create_mixer("identity", 6), x)
    assert torch.equal(M, torch.eye(12))


def pool_matrix(H, W):
    """PoolFormer's mixer by hand: 3x3 average over the in-bounds neighbours (count_include_pad=False) minus x."""
    L = H * W
    P = torch.zeros(L, L)
    for h in range(H):
        for w in range(W):
            nb = [(a, b) for a in range(h - 1, h + 2) for b in range(w - 1, w + 2) if 0 <= a < H and 0 <= b < W]
            for a, b in nb:
                P[h * W + w, a * W + b] = 1.0 / len(nb)
    return P - torch.eye(L)


def test_pooling_is_avgpool_minus_identity():
    x = torch.randn(2, 5, 4, 5)  # batch of 2: the matrices of the samples are averaged (equal: linear mixer)
    res = mixing_analysis(create_mixer("pooling", 5), x)
    torch.testing.assert_close(res.matrix, pool_matrix(4, 5), rtol=0, atol=1e-6)
    assert res.grid == (4, 5) and res.channels == list(range(5)) and res.layout == "NCHW"
    assert res.cross_channel.abs().max() < 1e-7  # channel-wise


def test_random_mixing_is_randformers_frozen_matrix():
    mixer = create_mixer("random", 4, context=dict(feat_size=(3, 4)))
    M = mixing_matrix(mixer, torch.randn(1, 4, 3, 4))
    torch.testing.assert_close(M, mixer.random_matrix, rtol=0, atol=1e-6)
    assert not torch.allclose(M, torch.full_like(M, 1 / 12), atol=1e-3)  # a real random matrix, not uniform


class StripProjection(nn.Module):
    """One Strip-MLP strip projection (CGSMM.proj_h or proj_w with its weights): linear, per channel group."""

    def __init__(self, cgsmm, which):
        super().__init__()
        self.cgsmm, self.which = cgsmm, which

    def forward(self, x):
        conv = getattr(self.cgsmm, self.which)
        return self.cgsmm._strip_proj(x, conv.weight, conv.bias, "w" if self.which == "proj_h" else "h")


@pytest.mark.parametrize("which", ["proj_h", "proj_w"])
def test_strip_mlp_strip_mixing_is_its_strip_matrices(which):
    H, W, C = 4, 5, 8
    cgsmm = create_mixer("cgsmm", C, context=dict(feat_size=(H, W)), groups=2)
    G = cgsmm.groups
    L_axis = W if which == "proj_h" else H
    weight = getattr(cgsmm, which).weight.detach().view(G, L_axis, L_axis, 3)  # [g, out, in, k]
    # by hand: mixing along the axis, a 3-wide window across it, matrix c % G for channel c
    Wm = weight[torch.arange(C) % G].mean(0)
    expect = torch.zeros(H, W, H, W)
    for h in range(H):
        for w in range(W):
            for k in range(3):
                if which == "proj_h":  # mixes along W, window over rows h + k - 1
                    if 0 <= h + k - 1 < H:
                        expect[h, w, h + k - 1, :] = Wm[w, :, k]
                elif 0 <= w + k - 1 < W:  # mixes along H, window over columns
                    expect[h, w, :, w + k - 1] = Wm[h, :, k]
    M = mixing_matrix(StripProjection(cgsmm, which), torch.randn(1, C, H, W))
    torch.testing.assert_close(M, expect.reshape(H * W, H * W), rtol=1e-5, atol=1e-6)


def test_raftmlp_token_mixing_is_its_raft_matrix():
    """RaftMLP's vertical token MLP made linear (norm and GELU removed): the raft matrix W2 W1 per raft position."""
    H, W, C, r = 4, 3, 6, 2
    raft = create_mixer("raft", C, context=dict(feat_size=(H, W)), raft_size=r)
    vertical = raft.vertical
    vertical.norm, vertical.act = nn.Identity(), nn.Identity()
    Wr = (vertical.fc2.weight @ vertical.fc1.weight).detach().view(r, H, r, H)  # [j_out, l_out, j_in, l_in]
    # channel c = j * (C / r) + co sits at raft position j: same-channel entries are Wr[j, :, j, :]
    per_channel = torch.stack([Wr[c // (C // r), :, c // (C // r), :] for c in range(C)]).mean(0)
    expect = torch.einsum("ab,wv->awbv", per_channel, torch.eye(W)).reshape(H * W, H * W)
    res = mixing_analysis(vertical, torch.randn(1, C, H, W))
    torch.testing.assert_close(res.matrix, expect, rtol=1e-5, atol=1e-6)
    assert res.cross_channel.max() > 1e-3  # rafts mix channels j * C/r + co across j


def test_strip_mix_kernel_op_through_the_custom_op():
    """The registered torch.library op (autograd formula) is differentiated like any module."""
    H, W, C = 3, 4, 4
    weight = torch.randn(1, H, H, 1)

    class Op(nn.Module):
        def forward(self, x):
            return strip_mix(x, weight, None, "h", 1)

    expect = torch.einsum("ab,wv->awbv", weight[0, :, :, 0], torch.eye(W)).reshape(H * W, H * W)
    torch.testing.assert_close(mixing_matrix(Op(), torch.randn(1, C, H, W)), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,dim,kwargs", [("attention", 8, dict(head_dim=4)), ("sepconv", 8, {}),
                                             ("mixshift", 10, {})])
def test_nonlinear_mixer_matches_brute_force_jacobian(name, dim, kwargs):
    torch.manual_seed(0)
    mixer = create_mixer(name, dim, context=dict(feat_size=(4, 4), stage_idx=2), **kwargs)
    x = torch.randn(1, dim, 4, 4)
    res = mixing_analysis(mixer, x, chunk_size=7)  # chunks that do not divide the probes
    same, cross = brute_force(mixer.eval(), x)
    torch.testing.assert_close(res.matrix, same, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.cross_channel, cross, rtol=1e-4, atol=1e-6)


def test_channel_subset_and_training_mode_restored():
    mixer = create_mixer("sepconv", 8).train()
    x = torch.randn(1, 8, 3, 3)
    res = mixing_analysis(mixer, x, channels=[1, 5])
    same, _ = brute_force(mixer, x)
    assert res.channels == [1, 5] and mixer.training
    full = mixing_analysis(mixer, x).matrix
    torch.testing.assert_close(full, same, rtol=1e-4, atol=1e-6)
    assert mixing_analysis(mixer, x, channels=3).channels == [0, 4, 7]
    with pytest.raises(ValueError, match="not in 0..7"):
        mixing_analysis(mixer, x, channels=[9])


def test_mixer_inside_zoo_metaformer_uses_the_captured_input():
    torch.manual_seed(0)
    model = timm.create_model("zoo_metaformer", token_mixers=["pooling", "sepconv", "attention", "attention"],
                              mixer_kwargs=[None, None, dict(head_dim=8), dict(head_dim=8)], **TINY)
    img = torch.randn(1, 3, 64, 64)
    mixer = model.stages[2].blocks[0].token_mixer
    seen = {}
    hook = model.stages[2].blocks[0].norm1.register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    model.eval()(img)
    hook.remove()
    res = mixing_analysis(model.train(), img, stage=2, block=0)
    assert model.training and res.path == "stages.2.blocks.0.token_mixer" and res.grid == (4, 4)
    same, cross = brute_force(mixer.eval(), seen["x"])  # attention: the matrix depends on the mixer's input
    torch.testing.assert_close(res.matrix, same, rtol=1e-4, atol=1e-6)
    other = mixing_matrix(mixer, torch.randn_like(seen["x"]))
    assert not torch.allclose(other, res.matrix, rtol=1e-3, atol=0)
    torch.testing.assert_close(mixing_matrix(model, img, 0, 0), pool_matrix(16, 16), rtol=0, atol=1e-6)


def test_randformer_at_its_built_size():
    """RandFormer S12 stage 3 (14x14, 320 channels): the frozen matrix exactly, from 4 channels."""
    model = timm.create_model("randformer_s12")
    res = mixing_analysis(model, torch.randn(1, 3, 224, 224), stage=2, block=1, channels=4)
    assert res.grid == (14, 14) and res.mixer == "RandomMixing" and len(res.channels) == 4
    torch.testing.assert_close(res.matrix, model.stages[2].blocks[1].token_mixer.random_matrix, rtol=0, atol=1e-6)


def test_timm_caformer_attention_on_token_sequences():
    """timm's CAFormer runs attention on (B, L, C) tokens: the layout and grid come from the stage."""
    model = TimmMetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=0,
                           token_mixers=(SepConv, SepConv, Attention, Attention),  # caformer_s18's layout
                           norm_layers=(LayerNorm2dNoBias, LayerNorm2dNoBias, LayerNormNoBias, LayerNormNoBias))
    img = torch.randn(1, 3, 96, 64)
    seen = {}
    hook = model.stages[2].blocks[0].norm1.register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    model.eval()(img)
    hook.remove()
    assert seen["x"].shape == (1, 24, 32)  # (B, L, C) tokens
    res = mixing_analysis(model, img, stage=2, block=0)
    assert res.layout == "NLC" and res.grid == (6, 4) and res.mixer == "Attention"
    mixer = model.stages[2].blocks[0].token_mixer
    as_map = lambda t: mixer(t.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(t.shape)  # noqa: E731
    same, cross = brute_force(as_map, seen["x"].transpose(1, 2).reshape(1, 32, 6, 4))
    torch.testing.assert_close(res.matrix, same, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.cross_channel, cross, rtol=1e-4, atol=1e-6)


def test_bespoke_blocks_and_models_without_mixers():
    # MambaOut (timm, NHWC blocks): the depthwise conv of the gated CNN block
    mo = timm.create_model("mambaout_femto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=0)
    path, mod = find_token_mixer(mo, 1, 0)
    assert path == "stages.1.blocks.0.conv" and isinstance(mod, nn.Conv2d)
    res = mixing_analysis(mo, torch.randn(1, 3, 128, 128), stage=1, block=0)
    assert res.grid == (16, 16)
    k = mod.weight.detach()[:, 0].mean(0)  # (7, 7) channel-averaged depthwise kernel: row of the centre token
    field = receptive_field(res.matrix, res.grid, (8, 8))
    torch.testing.assert_close(field[5:12, 5:12], k, rtol=1e-5, atol=1e-6)
    assert field[:5].abs().max() == 0
    # the whole block by path: its residual puts 1 on the diagonal
    blk = mixing_matrix(mo, torch.randn(1, 3, 128, 128), path="stages.1.blocks.0")
    assert blk.shape == (256, 256) and blk.diagonal().mean() > 0.5
    # AFFNet: the AFF mixer inside the AFF block; its MobileNet stage has none
    aff = timm.create_model("affnet_et")
    assert find_token_mixer(aff, 2, 0)[0].endswith(".token_mixer")
    with pytest.raises(ValueError, match=r"stages\[0\]\.blocks\[0\] \(InvertedResidual\) has no token mixer.*path="):
        find_token_mixer(aff, 0, 0)
    with pytest.raises(IndexError, match="has 4 stages"):
        find_token_mixer(aff, 7, 0)
    with pytest.raises(ValueError, match="give stage= and block="):
        mixing_matrix(aff, torch.randn(1, 3, 64, 64))


def test_bad_arguments_say_what_to_do():
    mixer = create_mixer("pooling", 4)
    with pytest.raises(ValueError, match="layout must be"):
        mixing_matrix(mixer, torch.randn(1, 4, 3, 3), layout="CHW")
    with pytest.raises(ValueError, match="not a square grid: pass grid="):
        mixing_matrix(nn.Identity(), torch.randn(1, 6, 4))
    torch.testing.assert_close(mixing_matrix(nn.Identity(), torch.randn(1, 6, 4), grid=(3, 2)), torch.eye(6))
    with pytest.raises(ValueError, match="keeps the channels"):
        mixing_matrix(nn.Conv2d(4, 2, 1), torch.randn(1, 4, 3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        mixing_matrix("pooling", torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="outside the 3x3"):
        receptive_field(torch.eye(9), (3, 3), (3, 0))


@pytest.mark.skipif("hydra" not in list_mixers(), reason="the hydra mixer is not registered (yet)")
def test_hydra_matches_brute_force_jacobian():
    torch.manual_seed(0)
    mixer = create_mixer("hydra", 16, headdim=8)  # d_inner = 2 * 16 = 32: 4 heads
    x = torch.randn(1, 16, 3, 3)
    same, cross = brute_force(mixer.eval(), x)
    res = mixing_analysis(mixer, x)
    torch.testing.assert_close(res.matrix, same, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.cross_channel, cross, rtol=1e-4, atol=1e-6)


# --- tools/mixing_matrix.py ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool():
    return load_script("tools/mixing_matrix.py", "zoo_mixing_matrix_cli")


def test_tool_help():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "mixing_matrix.py"), "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    for flag in ("--stage", "--block", "--out", "--mixers", "--size", "--query", "--checkpoint"):
        assert flag in out


def test_tool_writes_a_png_for_models_and_mixers(tool, tmp_path, capsys):
    out = tmp_path / "fig.png"
    results = tool.main(["zoo_metaformer", "--model-kwargs", "depths=(1,1,1,1)", "dims=(8,16,24,32)",
                         "--mixers", "pooling,random,identity", "--size", "4", "--stage", "2", "--query", "1,2",
                         "--out", str(out), "--channels", "0", "--cross-channel"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    h, w = matplotlib.image.imread(out).shape[:2]
    assert w >= 3 * 300 and h >= 3 * 300  # three columns side by side (3.3 in at 100 dpi), three rows
    labels = [r[0] for r in results]
    assert labels == ["pooling", "random", "identity"]
    torch.testing.assert_close(results[0][1].matrix, pool_matrix(4, 4), rtol=0, atol=1e-6)
    torch.testing.assert_close(results[2][1].matrix, torch.eye(16))
    assert "wrote" in capsys.readouterr().out


def test_tool_checkpoint_and_errors(tool, tmp_path):
    model = timm.create_model("randformer_s12", num_classes=3)
    torch.save({"state_dict": model.state_dict(), "args": {"model": "randformer_s12", "num_classes": 3}},
               tmp_path / "ckpt.pth.tar")
    results = tool.main(["randformer_s12", "--checkpoint", str(tmp_path / "ckpt.pth.tar"), "--stage", "3",
                         "--block", "1", "--channels", "2", "--out", str(tmp_path / "r.png")])
    torch.testing.assert_close(results[0][1].matrix, model.stages[3].blocks[1].token_mixer.random_matrix,
                               rtol=0, atol=1e-6)  # the checkpoint's frozen matrix, not a fresh draw
    torch.save({"state_dict": {"bogus": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match="Nothing was loaded"):
        tool.main(["randformer_s12", "--checkpoint", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="unknown mixer"):
        tool.main(["zoo_metaformer", "--mixers", "poolin", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="has no token mixer"):
        tool.main(["affnet_et", "--stage", "0", "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_tool_without_matplotlib_says_how_to_install(tool, monkeypatch, tmp_path):
    monkeypatch.setattr(tool, "Figure", None)
    with pytest.raises(SystemExit, match=r"pip install 'metaformer-zoo\[plot\]'"):
        tool.main(["zoo_metaformer", "--out", str(tmp_path / "p.png")])


def test_every_card_ends_with_its_mixing_matrix_figure():
    """Each family card's last section shows the family's figure (committed, small) drawn by the tool."""
    cards = ROOT / "model_cards"
    for fam in zoo.list_families():
        if fam.name == "composed":
            continue
        text = (cards / f"{fam.card}.md").read_text()
        section = text.rsplit("\n## ", 1)[-1]
        assert section.startswith("Mixing matrix"), f"{fam.card}.md: the last section is not 'Mixing matrix'"
        fig = cards / "figures" / f"mixing_{fam.name}.png"
        assert f"(figures/{fig.name})" in section and "random init" in section
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < fig.stat().st_size < 150_000, fig

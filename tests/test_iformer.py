"""iFormer (Inception Transformer, sail-sg/iFormer): sizes, official layout round trip, layout traps, input sizes.

Parity against the real official code was measured outside the repo (see model_cards/iformer.md); here the official
layout is produced by ``official_state_dict`` (the inverse of the filter) and checked structurally.
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

import metaformer_zoo  # noqa: F401
from helpers import (ceil_sizes, check_filter_rejects, check_forward_sizes, check_input_errors,
                     check_official_roundtrip, check_resized_load, intermediate_sizes, perturb)
from metaformer_zoo.checkpoint import CheckpointError
from metaformer_zoo.dense.core import resolve_out_norms
from metaformer_zoo.mixers.inception_transformer import InceptionMixer, LowMixer
from metaformer_zoo.models import inception_transformer as ifm
from metaformer_zoo.zoo import count_macs, count_params, family_of

PARAMS = {  # exact counts of the official models (reference/iformer_transxnet.md §1)
    "iformer_small": 19_866_344, "iformer_base": 47_866_216, "iformer_large": 86_637_096,
    "iformer_small_384": 20_899_944, "iformer_base_384": 48_936_296, "iformer_large_384": 87_743_656,
}
MACS = {  # FlopCounterMode / 2 of the official models
    "iformer_small": 4.826e9, "iformer_base": 9.342e9, "iformer_large": 14.004e9,
    "iformer_small_384": 16.031e9, "iformer_base_384": 30.445e9, "iformer_large_384": 45.209e9,
}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return perturb(timm.create_model("iformer_small"))


def test_names_do_not_touch_timm_iformer():
    # timm's unrelated mobile iFormer keeps its own entries
    for n in ("iformer_t", "iformer_s", "iformer_m", "iformer_l"):
        assert timm.models.model_entrypoint(n).__module__ == "timm.models.iformer"
    for n in PARAMS:
        assert timm.models.model_entrypoint(n).__module__ == "metaformer_zoo.models.inception_transformer"
    assert family_of("iformer_small").name == "iformer"


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_count(name):
    assert count_params(timm.create_model(name, device="meta"))[0] == PARAMS[name]


@pytest.mark.parametrize("name", [n if n == "iformer_small" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MACS])
def test_macs(name):
    size = 384 if name.endswith("_384") else 224
    macs = count_macs(timm.create_model(name, device="meta"), (3, size, size), device="meta")
    assert abs(macs / MACS[name] - 1) < 0.01


def test_official_layout_roundtrip(small):
    sd = ifm.official_state_dict(small)
    # official layout facts (sail-sg/iFormer inception_transformer.py, 373 keys for S)
    assert len(sd) == 373
    assert sd["pos_embed1"].shape == (1, 56, 56, 96) and sd["pos_embed4"].shape == (1, 7, 7, 384)
    assert sd["blocks1.0.mlp.fc1.weight"].shape == (384, 96)  # Linear (channels-last) MLP
    assert sd["patch_embed.proj1.weight"].shape == (48, 3, 3, 3) and "patch_embed2.norm.running_var" in sd
    assert not any(k.startswith(("blocks1.", "blocks2.")) and "layer_scale" in k for k in sd)
    assert sd["blocks3.0.layer_scale_1"].shape == (320,) and "blocks4.2.layer_scale_2" in sd
    assert sd["head.weight"].shape == (1000, 384) and sd["norm.weight"].shape == (384,)
    # stage 1: high 64 (conv half 32 -> 64, pool half 32 -> 64) + low 32 -> fuse 160
    assert sd["blocks1.0.attn.high_mixer.conv1.weight"].shape == (64, 32, 1, 1)
    assert sd["blocks1.0.attn.high_mixer.proj2.bias"].shape == (64,)
    assert "blocks1.0.attn.high_mixer.conv1.bias" not in sd and "blocks1.0.attn.high_mixer.proj1.bias" not in sd
    assert sd["blocks1.0.attn.low_mixer.qkv.weight"].shape == (96, 32)
    assert sd["blocks1.0.attn.conv_fuse.weight"].shape == (160, 1, 3, 3)
    assert sd["blocks1.0.attn.proj.weight"].shape == (96, 160, 1, 1)

    # into a fresh build (same outputs) and back to the same official tensors
    check_official_roundtrip(ifm, small, timm.create_model("iformer_small").eval(), sd)


def test_filter_rejects_bad_checkpoints(small):
    sd = ifm.official_state_dict(small)
    model = timm.create_model("iformer_small", device="meta")
    check_filter_rejects(ifm, model, sd, foreign={"foo.weight": torch.zeros(1)}, drop="blocks3.0.layer_scale_1")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        ifm.checkpoint_filter_fn(sd, timm.create_model("iformer_base", device="meta"))


def test_pos_embed_resized_in_filter():
    """Weights of a model built for one img_size load into another, giving the first model's outputs."""
    torch.manual_seed(0)
    b = check_resized_load(ifm, "iformer_small", 64, 128, depths=(1, 1, 2, 1), attention_heads=[1, 3, 7, 9, 11])
    assert b.stages[0].pos_embed.shape == (1, 32, 32, 96)


@pytest.mark.slow
def test_224_weights_into_384_model(small):
    m384 = timm.create_model("iformer_small_384").eval()
    m384.load_state_dict(ifm.checkpoint_filter_fn(ifm.official_state_dict(small), m384))
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(m384(x), small(x), rtol=1e-5, atol=1e-5)


def test_channel_split_order():
    """First half of the high channels -> conv path, second half -> max-pool path, last low_dim -> attention."""
    torch.manual_seed(0)
    m = InceptionMixer(96, num_heads=3, attention_head=1, pool_size=2).eval()
    assert (m.high_dim, m.low_dim) == (64, 32)
    x = torch.randn(1, 96, 8, 8)

    def sensitive(channels):
        x2 = x.clone()
        x2[:, channels] += 1.0
        with torch.no_grad():
            return not torch.allclose(m(x2), m(x))

    with torch.no_grad():
        conv1, proj2, qkv = m.high_mixer.conv1.weight.clone(), m.high_mixer.proj2.weight.clone(), m.low_mixer.qkv.weight.clone()
        m.high_mixer.conv1.weight.zero_()
        assert not sensitive(slice(0, 32)) and sensitive(slice(32, 64)) and sensitive(slice(64, 96))
        m.high_mixer.conv1.weight.copy_(conv1)
        m.high_mixer.proj2.weight.zero_()
        assert sensitive(slice(0, 32)) and not sensitive(slice(32, 64))
        m.high_mixer.proj2.weight.copy_(proj2)
        m.low_mixer.qkv.weight.zero_()
        m.low_mixer.qkv.bias.zero_()
        assert not sensitive(slice(64, 96))
        m.low_mixer.qkv.weight.copy_(qkv)


def test_frequency_ramp_and_layer_scale():
    m = timm.create_model("iformer_small", device="meta")
    low = [[b.token_mixer.low_dim for b in s.blocks] for s in m.stages]
    assert low == [[32] * 3, [96] * 3, [224] * 4 + [288] * 5, [352] * 3]  # two-step ramp inside stage 3
    pools = [s.blocks[0].token_mixer.low_mixer.pool_size for s in m.stages]
    assert pools == [2, 2, 1, 1]
    names = [n for n, _ in m.named_parameters() if "layer_scale" in n]
    assert names and all(n.startswith(("stages.2.", "stages.3.")) for n in names)
    m = timm.create_model("iformer_small")
    assert torch.all(m.stages[2].blocks[0].layer_scale1.scale == 1e-6)


def _official_low_mixer(mod: LowMixer, x):
    """The official LowMixer forward (AvgPool floor + nearest Upsample x2 + square view), for even square maps."""
    B = x.shape[0]
    pool = nn.AvgPool2d(mod.pool_size, stride=mod.pool_size, count_include_pad=False) if mod.pool_size > 1 else None
    xa = pool(x) if pool is not None else x
    xa = xa.permute(0, 2, 3, 1).reshape(B, -1, mod.dim)
    N, C = xa.shape[1], xa.shape[2]
    qkv = mod.qkv(xa).reshape(B, N, 3, mod.num_heads, C // mod.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * mod.scale).softmax(dim=-1)
    xa = (attn @ v).transpose(2, 3).reshape(B, C, N).view(B, C, int(N ** 0.5), int(N ** 0.5))
    return nn.Upsample(scale_factor=mod.pool_size)(xa) if pool is not None else xa


@pytest.mark.parametrize("pool", [1, 2])
def test_low_mixer_matches_official_at_even_square_sizes(pool):
    torch.manual_seed(0)
    mod = LowMixer(64, num_heads=2, qkv_bias=True, pool_size=pool).eval()
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), _official_low_mixer(mod, x), rtol=0, atol=1e-6)
        # odd / non-square maps run and keep the map size
        assert mod(torch.randn(1, 64, 7, 10)).shape == (1, 64, 7, 10)


@pytest.mark.parametrize("size", [(224, 224), (104, 104), (72, 136)])
def test_forward_sizes(small, size):
    """Official sizes plus what the official code cannot run: not a multiple of 16, non-square."""
    check_forward_sizes(small, size)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 256), (232, 232), (224, 320), (200, 136), (384, 384), (800, 1216)])
def test_forward_sizes_slow(small, size):
    assert intermediate_sizes(small, size) == ceil_sizes(size)


def test_bad_inputs_raise(small):
    check_input_errors(small)
    with pytest.raises(ValueError, match="attention_head"):
        InceptionMixer(64, num_heads=2, attention_head=2)


def test_features_only_and_no_weight_decay():
    m = timm.create_model("iformer_small", features_only=True, depths=(1, 1, 2, 1),
                          attention_heads=[1, 3, 7, 9, 11]).eval()
    assert m.feature_info.reduction() == [4, 8, 16, 32] and m.feature_info.channels() == [96, 192, 320, 384]
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 16, 24), (1, 192, 8, 12), (1, 320, 4, 6), (1, 384, 2, 3)]
    nwd = timm.create_model("iformer_small", device="meta").no_weight_decay()
    assert {f"stages.{i}.pos_embed" for i in range(4)} <= nwd
    assert "stages.2.blocks.0.layer_scale1.scale" in nwd and "stages.3.blocks.2.layer_scale2.scale" in nwd


def test_dense_out_norms_declared_none():
    """No official dense code: the spec declares no per-output norm, so 'official' gives raw outputs (not the
    adapter's LayerNorm2d default), and timm's unrelated iformer_s is not an iFormer variant."""
    assert ifm.SPEC.dense_out_norms == (None,) * 4 and family_of("iformer_small_384") is ifm.SPEC
    assert resolve_out_norms("iformer_small", (0, 1, 2, 3), (96, 192, 320, 384)) == [None] * 4
    assert all(isinstance(n, LayerNorm2d) for n in resolve_out_norms("iformer_base", (2, 3), (384, 512), True))
    with pytest.raises(ValueError):
        family_of("iformer_s")


def test_inception_mixer_in_zoo_metaformer():
    torch.manual_seed(0)
    m = timm.create_model("zoo_metaformer", token_mixers=["inception", "inception", "sepconv", "inception"],
                          depths=(1, 1, 1, 1), dims=(64, 128, 160, 256), num_classes=5)
    mixers = [s.blocks[0].token_mixer for s in m.stages]
    assert mixers[0].low_mixer.pool_size == 2 and mixers[3].low_mixer.pool_size == 1
    out = m(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_pretrained_file_overlay(tmp_path):
    """An official-format file on disk (raw state dict) loads through timm's pretrained path."""
    torch.manual_seed(0)
    kw = dict(depths=(1, 1, 2, 1), attention_heads=[1, 3, 7, 9, 11])
    src = perturb(timm.create_model("iformer_small", **kw))
    path = tmp_path / "iformer_small.pth"
    torch.save(ifm.official_state_dict(src), path)
    model = timm.create_model("iformer_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src(x), rtol=0, atol=0)


def test_spec_declares_the_registered_models():
    """The one declaration generates timm's names, tags and cfgs (unchanged) and carries the official numbers."""
    spec = ifm.SPEC
    assert family_of("iformer_large") is spec and spec.model_cls is ifm.InceptionTransformer
    ours = [n for n in timm.list_pretrained("iformer_*") if n.split(".")[0] in PARAMS]  # not timm's iformer_t/s/m/l/h
    assert sorted(ours) == sorted(f"{n}.sail_in1k" for n in PARAMS)
    for name, cfg in spec.pretrained_cfgs().items():
        assert timm.models.model_entrypoint(name.split(".")[0]).__module__ == ifm.__name__
        registered = timm.models.get_pretrained_cfg(name).to_dict()
        assert {k: registered[k] for k in cfg} == dict(cfg), name
        assert registered["url"] == f"https://huggingface.co/sail/dl2/resolve/main/iformer/{name.split('.')[0]}.pth"
        big = name.split(".")[0].endswith("_384")
        assert registered["input_size"] == (3,) + (384 if big else 224,) * 2
        assert registered["crop_pct"] == (1.0 if big else 0.9) and registered["first_conv"] == "stem.proj1"
    for v in spec.models:
        assert v.params == PARAMS[v.name] and abs(v.macs / MACS[v.name] - 1) < 1e-3 and v.top1 > 80
    assert spec.official.filter is ifm.checkpoint_filter_fn and spec.official.wrapper is None
    assert "si2022inception" in spec.citation and spec.recipe == "iformer" and spec.arxiv == "2205.12956"

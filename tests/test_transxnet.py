"""TransXNet (LMMMEng/TransXNet): sizes, official layout round trip, layout traps, input sizes, batch-1 training.

Parity against the real official code was measured outside the repo (see model_cards/transxnet.md); here the official
layout is produced by ``official_state_dict`` (the inverse of the filter) and checked structurally.
"""
import argparse

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import metaformer_zoo  # noqa: F401
from helpers import (ceil_sizes, check_filter_rejects, check_forward_sizes, check_input_errors,
                     check_official_roundtrip, check_resized_load, intermediate_sizes, perturb)
from metaformer_zoo.checkpoint import CheckpointError, load_checkpoint_file
from metaformer_zoo.dense.core import resolve_out_norms
from metaformer_zoo.hub import convert_checkpoint
from metaformer_zoo.mixers.transxnet import DMixer, DynamicConv2d, resize_rel_pos
from metaformer_zoo.models import transxnet as txn
from metaformer_zoo.zoo import count_macs, count_params, family_of

PARAMS = {"transxnet_t": 12_834_808, "transxnet_s": 26_864_068, "transxnet_b": 48_009_002}
MACS = {"transxnet_t": 1.807e9, "transxnet_s": 4.607e9, "transxnet_b": 8.353e9}  # FlopCounterMode / 2, official


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return perturb(timm.create_model("transxnet_t"))


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_count(name):
    assert count_params(timm.create_model(name, device="meta"))[0] == PARAMS[name]
    assert family_of(name).official.wrapper == "state_dict"


def test_param_count_384_build():
    # official TransXNet(arch='b', image_size=384): larger relative position tables
    assert count_params(timm.create_model("transxnet_b", img_size=384, device="meta"))[0] == 52_409_402


@pytest.mark.parametrize("name", [n if n == "transxnet_t" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MACS])
def test_macs(name):
    macs = count_macs(timm.create_model(name, device="meta"), (3, 224, 224), device="meta")
    assert abs(macs / MACS[name] - 1) < 0.01


def test_official_layout_roundtrip(tiny):
    sd = txn.official_state_dict(tiny)
    assert len(sd) == 1508  # official key count for T
    assert sd["relative_pos_enc.0"].shape == (1, 1, 3136, 49) and sd["relative_pos_enc.3"].shape == (1, 8, 49, 49)
    assert sd["patch_embed.proj.conv.weight"].shape == (48, 3, 7, 7) and "patch_embed.proj.conv.bias" not in sd
    assert sd["network.1.proj.conv.weight"].shape == (96, 48, 3, 3) and "network.5.proj.bn.running_var" in sd
    assert sd["network.0.0.layer_scale_1.weight"].shape == (48, 1, 1, 1)
    assert sd["network.0.0.layer_scale_1.bias"].shape == (48,)
    assert sd["network.0.0.token_mixer.local_unit.weight"].shape == (2, 24, 7, 7)
    assert sd["network.0.0.token_mixer.local_unit.proj.0.conv.weight"].shape == (6, 24, 1, 1)
    assert sd["network.0.0.token_mixer.global_unit.sr.0.conv.weight"].shape == (24, 1, 11, 11)
    assert sd["network.0.0.token_mixer.proj.3.weight"].shape == (16, 48, 1, 1)  # STE inner max(16, dim // 8)
    assert sd["network.0.0.mlp.dwconv.proj.0.weight"].shape == (48, 1, 1, 1)  # kernel-1 group
    assert "network.6.0.token_mixer.global_unit.sr.0.conv.weight" not in sd  # sr = 1: identity
    assert sd["classifier.0.weight"].shape == (448,) and sd["classifier.2.weight"].shape == (1000, 448, 1, 1)

    # official files are timm CheckpointSaver dicts: weights under "state_dict"
    check_official_roundtrip(txn, tiny, timm.create_model("transxnet_t").eval(), sd,
                             checkpoint={"state_dict": sd, "epoch": 299, "arch": "transxnet_t"})


def test_official_constants(tiny):
    blk = tiny.stages[0].blocks[0]
    assert isinstance(blk.norm1, nn.GroupNorm) and blk.norm1.num_groups == 1 and blk.norm1.eps == 1e-5
    assert tiny.head.norm.num_groups == 1 and tiny.head.norm.eps == 1e-5
    assert tiny.stem.conv.padding == (3, 3) and tiny.stem.conv.stride == (4, 4)
    fresh = timm.create_model("transxnet_t", device="meta")
    ls = fresh.stages[1].blocks[0].layer_scale_1
    assert ls.weight.shape == (96, 1, 1, 1) and ls.bias.shape == (96,)
    # all blocks of a stage share one bias
    assert sum("relative_pos_enc" in n for n, _ in fresh.named_parameters()) == 4


def test_filter_rejects_bad_checkpoints(tiny):
    sd = txn.official_state_dict(tiny)
    model = timm.create_model("transxnet_t", device="meta")
    check_filter_rejects(txn, model, sd, foreign={"state_dict": {"foo.weight": torch.zeros(1)}},
                         drop="network.2.1.layer_scale_2.bias")
    dense = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    dense["norm0.weight"] = torch.ones(48)
    with pytest.raises(CheckpointError, match="dense-prediction"):
        txn.checkpoint_filter_fn(dense, model)


def test_rel_pos_resized_in_filter():
    """Tables built for one img_size load into another build and reproduce the first model (official runtime rule)."""
    torch.manual_seed(0)
    b = check_resized_load(txn, "transxnet_t", 64, 96, depths=(1, 1, 1, 1))
    assert b.stages[0].relative_pos_enc.shape == (1, 1, 576, 9)


def test_resize_rel_pos_is_flattened_bicubic():
    rel = torch.randn(1, 2, 16, 4)
    out = resize_rel_pos(rel, 36, 9)
    torch.testing.assert_close(out, F.interpolate(rel, size=(36, 9), mode="bicubic", align_corners=False))
    assert resize_rel_pos(rel, 16, 4) is rel


@pytest.mark.parametrize("size", [(224, 224), (102, 102), (64, 160)])
def test_forward_sizes(tiny, size):
    check_forward_sizes(tiny, size)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 256), (230, 230), (224, 320), (384, 384), (800, 1216)])
def test_forward_sizes_slow(tiny, size):
    assert intermediate_sizes(tiny, size) == ceil_sizes(size)


def test_batch1_training_step():
    torch.manual_seed(0)
    model = timm.create_model("transxnet_t", depths=(1, 1, 1, 1), num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idconv = model.stages[0].blocks[0].token_mixer.local_unit
    before = idconv.proj[0].bn.running_mean.clone()
    loss = F.cross_entropy(model(torch.randn(1, 3, 96, 96)), torch.tensor([3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # the kernel branch still updates the BN statistics (batch stats over the K x K pooled map)
    assert not torch.equal(before, idconv.proj[0].bn.running_mean)


def test_idconv_batch1_fallback_only_changes_training_at_batch1():
    torch.manual_seed(0)
    m = DynamicConv2d(16, kernel_size=7, num_groups=2)
    with torch.no_grad():
        m.proj[0].bn.running_mean.normal_()
        m.proj[0].bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, 10, 12)
    m.eval()
    with torch.no_grad():
        ref = m(x)
        # eval: per-sample results equal the batch result
        torch.testing.assert_close(torch.cat([m(x[i:i + 1]) for i in range(3)]), ref, rtol=1e-5, atol=1e-6)
        # the official op (plain proj on the global mean) at batch 1 in training mode raises ...
        m.train()
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            m.proj(x[:1].mean(dim=(-2, -1), keepdim=True))
        # ... the zoo module runs, using the running statistics for that single call
        out = m(x[:1])
        assert out.shape == (1, 16, 10, 12) and torch.isfinite(out).all()


def test_bad_inputs_raise(tiny):
    check_input_errors(tiny)
    with pytest.raises(ValueError, match="even"):
        DMixer(33)


def test_features_only_no_weight_decay_dense_norms():
    m = timm.create_model("transxnet_t", features_only=True, depths=(1, 1, 1, 1)).eval()
    assert m.feature_info.reduction() == [4, 8, 16, 32] and m.feature_info.channels() == [48, 96, 224, 448]
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 48, 16, 24), (1, 96, 8, 12), (1, 224, 4, 6), (1, 448, 2, 3)]
    full = timm.create_model("transxnet_t", device="meta")
    nwd = full.no_weight_decay()
    assert {f"stages.{i}.relative_pos_enc" for i in range(4)} <= nwd
    for k in ("layer_scale_1.weight", "layer_scale_1.bias", "token_mixer.local_unit.weight",
              "token_mixer.local_unit.bias"):
        assert f"stages.1.blocks.0.{k}" in nwd
    assert "stages.1.blocks.0.pos_embed.weight" not in nwd
    norms = resolve_out_norms("transxnet_s", (0, 1, 2, 3), (64, 128, 320, 512))
    for norm, dim in zip(norms, (64, 128, 320, 512)):
        assert type(norm) is nn.GroupNorm and norm.num_groups == 1 and norm.num_channels == dim
        assert norm.eps == 1e-5 and norm.affine
    # official RetinaNet start_level=1: output 0 without norm (the adapter's out_norm_skip)
    norms = resolve_out_norms("transxnet_t", (0, 1, 2, 3), (48, 96, 224, 448), out_norm_skip=(0,))
    assert norms[0] is None and all(type(n) is nn.GroupNorm for n in norms[1:])


def test_dmixer_in_zoo_metaformer():
    torch.manual_seed(0)
    m = timm.create_model("zoo_metaformer", token_mixers=["dmixer", "sepconv", "dmixer", "attention"],
                          depths=(1, 1, 1, 1), dims=(64, 128, 160, 256), num_classes=5, img_size=64)
    mixer = m.stages[0].blocks[0].token_mixer
    assert mixer.global_unit.sr_ratio == 8 and m.stages[2].blocks[0].token_mixer.global_unit.sr_ratio == 2
    assert mixer.relative_pos_enc is not None and "stages.0.blocks.0.token_mixer.relative_pos_enc" in m.no_weight_decay()
    out = m(torch.randn(2, 3, 64, 96))  # other size than built for: the bias is resized
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_pretrained_file_overlay(tmp_path):
    """An official-format file on disk loads through timm's pretrained path (filter + strict load)."""
    torch.manual_seed(0)
    kw = dict(depths=(1, 1, 1, 1))
    src = perturb(timm.create_model("transxnet_t", **kw))
    path = tmp_path / "transx-t.pth.tar"
    torch.save({"epoch": 299, "arch": "transxnet_t", "state_dict": txn.official_state_dict(src)}, path)
    model = timm.create_model("transxnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


def test_official_file_with_args_namespace(tmp_path):
    """Official files pickle the training argparse.Namespace: the one safe reader (weights_only, Namespace allowed)
    reads them, and conversion picks the EMA weights first, as timm's pretrained loading does."""
    torch.manual_seed(0)
    kw = dict(depths=(1, 1, 1, 1))
    src = perturb(timm.create_model("transxnet_t", **kw))
    ema_src = perturb(timm.create_model("transxnet_t", **kw), seed=1)
    sd, ema = txn.official_state_dict(src), txn.official_state_dict(ema_src)
    path = tmp_path / "transx-t.pth.tar"
    torch.save({"epoch": 299, "arch": "transxnet_t", "state_dict": sd, "state_dict_ema": ema, "metric": 81.6,
                "args": argparse.Namespace(model="transxnet_t", lr=2e-3, drop_path=0.1)}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # plain safe loading refuses the Namespace
    obj = load_checkpoint_file(str(path))
    assert torch.equal(obj["state_dict"]["classifier.0.bias"], sd["classifier.0.bias"])
    model = timm.create_model("transxnet_t", **kw).eval()
    model.load_state_dict(txn.SPEC.official.filter(obj["state_dict"], model))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
        torch.testing.assert_close(convert_checkpoint("transxnet_t", str(path), **kw)(x), ema_src(x), rtol=0, atol=0)


def test_spec_declares_the_registered_models():
    """The one declaration generates timm's names, tags and cfgs (unchanged) and carries the official numbers."""
    spec = txn.SPEC
    assert family_of("transxnet_b") is spec and spec.model_cls is txn.TransXNet
    assert sorted(timm.list_pretrained("transxnet_*")) == [
        "transxnet_b.in1k", "transxnet_b.in1k_384", "transxnet_s.in1k", "transxnet_t.in1k"]
    assert timm.models.get_pretrained_cfg("transxnet_b").tag == "in1k"  # the default tag
    for name, cfg in spec.pretrained_cfgs().items():
        assert timm.models.model_entrypoint(name.split(".")[0]).__module__ == txn.__name__
        registered = timm.models.get_pretrained_cfg(name).to_dict()
        assert {k: registered[k] for k in cfg} == dict(cfg), name
    crop = {n: timm.models.get_pretrained_cfg(n).crop_pct for n in timm.list_pretrained("transxnet_*")}
    assert crop == {"transxnet_t.in1k": 0.9, "transxnet_s.in1k": 0.9, "transxnet_b.in1k": 0.95,
                    "transxnet_b.in1k_384": 1.0}
    assert timm.models.get_pretrained_cfg("transxnet_b.in1k_384").url.endswith("/transx-b-384.pth.tar")
    for v in spec.models:
        assert v.params == PARAMS[v.name] and abs(v.macs / MACS[v.name] - 1) < 3e-3 and v.top1 > 80
    assert spec.official.filter is txn.checkpoint_filter_fn and spec.official.wrapper == "state_dict"
    assert "lou2025transxnet" in spec.citation and spec.recipe == "transxnet" and spec.arxiv == "2310.19380"

"""zoo_supernet: candidate mixers per block, placements, presets in the checkpoint, export, sandwich training."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from timm.models import save_for_hf

import metaformer_zoo  # noqa: F401
from metaformer_zoo.dense.core import DenseBackbone
from metaformer_zoo.models.supernet import MetaFormerSupernet, MixerChoice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), mixers=("pooling", "sepconv", "attention"),
            num_classes=10, img_size=32)
MIXED = [["pooling"], ["sepconv"], ["attention", "pooling"], ["sepconv"]]


def _tiny(**kw):
    torch.manual_seed(0)
    return timm.create_model("zoo_supernet", **dict(TINY, **kw)).eval()


def test_default_create_and_presets():
    model = timm.create_model("zoo_supernet")
    assert isinstance(model, MetaFormerSupernet)
    assert set(model.presets) == {"fast", "balanced", "accurate"}
    assert model.placement == model.presets["accurate"] == model.largest_placement()
    assert model.presets["fast"][0] == ("pooling", "pooling")
    choices = [m for m in model.modules() if isinstance(m, MixerChoice)]
    assert len(choices) == sum((2, 2, 6, 2))
    assert all(list(c.candidates) == ["pooling", "sepconv", "attention"] for c in choices)


def test_set_placement_switches_outputs_and_active_mixers():
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for name in ("fast", "balanced", "accurate"):
        p = model.set_placement(name)
        assert model.placement == p
        outs[name] = model(x)
    assert not torch.allclose(outs["fast"], outs["accurate"])
    model.set_placement(MIXED)
    blocks = model.stages[2].blocks
    assert [b.token_mixer.active for b in blocks] == ["attention", "pooling"]


def test_bad_placements_and_mixers_raise_clearly():
    model = _tiny()
    with pytest.raises(ValueError, match="unknown placement preset 'turbo'"):
        model.set_placement("turbo")
    with pytest.raises(ValueError, match="one entry per stage"):
        model.set_placement(["pooling"] * 3)
    with pytest.raises(ValueError, match="not a candidate"):
        model.set_placement(["pooling", "pooling", "ss2d", "pooling"])
    with pytest.raises(ValueError, match="stage 2 lists 1 mixers but the stage has 2 blocks"):
        model.set_placement([["pooling"], ["pooling"], ["pooling"], ["pooling"]])
    with pytest.raises(ValueError, match="unknown token mixer"):
        _tiny(mixers=("pooling", "nosuchmixer"))
    with pytest.raises(TypeError, match="mixers=\\[...\\]"):
        _tiny(token_mixers="pooling")


@pytest.mark.parametrize("placement", ["fast", MIXED])
def test_export_is_plain_zoo_metaformer_with_same_outputs(placement):
    model = _tiny()
    plain = model.export(placement)
    assert type(plain).__name__ == "MetaFormer" and plain.pretrained_cfg["architecture"] == "zoo_metaformer"
    assert not any(isinstance(m, MixerChoice) for m in plain.modules())
    sd = model.placement_state_dict(placement)
    assert set(plain.state_dict()) == set(sd)
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    model.set_placement(placement)
    torch.testing.assert_close(plain.eval()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("placement", ["fast", MIXED])
def test_features_only_and_intermediates(placement):
    x = torch.randn(1, 3, 64, 64)
    model = _tiny()
    model.set_placement(placement)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in feats] == [16, 32, 48, 64]
    torch.manual_seed(0)  # the same init as _tiny(): same weights, so the features must match
    fnet = timm.create_model("zoo_supernet", features_only=True, placement=placement, **TINY)
    out = fnet.eval()(x)
    assert [o.shape[-1] for o in out] == [16, 8, 4, 2]
    for a, b in zip(out, feats):
        torch.testing.assert_close(a, b)


def test_presets_round_trip_through_state_dict_and_hub_folder(tmp_path):
    model = _tiny()
    custom = {"tiny": ["pooling"] * 4, "mixed": MIXED}
    model.presets = custom
    sd = model.state_dict()
    fresh = _tiny()
    assert set(fresh.presets) == {"fast", "balanced", "accurate"}
    fresh.load_state_dict(sd)  # the buffer brings the stored presets, even with another length
    assert set(fresh.presets) == {"tiny", "mixed"}
    assert fresh.presets["mixed"] == fresh.normalize_placement(MIXED)
    save_for_hf(model, str(tmp_path), model_args=dict(TINY), safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert loaded.presets == model.presets
    loaded.set_placement("mixed")
    model.set_placement("mixed")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x))


def test_sample_placements_sandwich():
    model = _tiny()
    gen = torch.Generator().manual_seed(3)
    ps = model.sample_placements(3, generator=gen)
    assert len(ps) == 5 and ps[0] == model.largest_placement() and ps[1] == model.smallest_placement()
    again = model.sample_placements(3, generator=torch.Generator().manual_seed(3))
    assert again == ps
    for p in ps:
        assert model.normalize_placement(p) == p


def test_train_sandwich_step_updates_every_candidate(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train  # noqa: E402
    model = _tiny()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = train.parse_args(["--sandwich", "2", "--seed", "0"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt.zero_grad()
    loss = train.sandwich_step(model, x, y, torch.nn.CrossEntropyLoss(), args, lambda: torch.autocast("cpu",
                               enabled=False), None, opt, step=0)
    assert torch.isfinite(loss)
    after = model.state_dict()
    for name in ("sepconv", "attention"):  # largest (attention) and smallest (pooling) ran; sepconv by chance
        key = next(k for k in after if f"candidates.{name}." in k and "weight" in k)
        if name == "attention":
            assert not torch.equal(before[key], after[key])
    assert model.placement == model.largest_placement()


def test_train_sandwich_rejects_plain_models(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train  # noqa: E402
    with pytest.raises(ValueError, match="--sandwich trains mixer supernets"):
        train.main(["--recipe", "digits", "--sandwich", "1", "--epochs", "1", "--max-steps-per-epoch", "1",
                    "--output", str(tmp_path), "--no-progress", "--digits-size", "32", "--img-size", "32"])


def test_placement_search_help():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "placement_search.py"), "--help"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert out.returncode == 0 and "Pareto" in out.stdout and "--write-presets" in out.stdout


def test_placement_search_pareto_front():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import placement_search as ps  # noqa: E402
    rows = [dict(label="a", placement=("a",), top1=90.0, img_s=100.0, macs=1),
            dict(label="b", placement=("b",), top1=95.0, img_s=50.0, macs=2),
            dict(label="c", placement=("c",), top1=89.0, img_s=40.0, macs=3),  # dominated by both
            dict(label="d", placement=("d",), top1=94.5, img_s=80.0, macs=2)]
    front = ps.pareto_front(rows)
    assert [r["label"] for r in front] == ["a", "d", "b"]
    chosen = ps.choose_presets(front, drop=1.0)
    assert chosen == dict(fast=("a",), balanced=("d",), accurate=("b",))


_DDP_SANDWICH = """
import sys, torch, timm, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import metaformer_zoo, train
dist.init_process_group("gloo")
rank = dist.get_rank()
kw = dict(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), mixers=("pooling", "sepconv", "attention"), num_classes=10,
          img_size=32)
torch.manual_seed(0)
model = timm.create_model("zoo_supernet", **kw).train()
ref = timm.create_model("zoo_supernet", **kw).train()
ref.load_state_dict(model.state_dict())
before = {k: v.clone() for k, v in model.state_dict().items()}
args = train.parse_args(["--sandwich", "2", "--seed", "0"])
g = torch.Generator().manual_seed(1)
data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
no_amp, ce, lr = (lambda: torch.autocast("cpu", enabled=False)), torch.nn.CrossEntropyLoss(), 0.5
ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
opt = torch.optim.SGD(model.parameters(), lr=lr)
opt.zero_grad()
train.sandwich_step(ddp, *data[rank], ce, args, no_amp, None, opt, step=0)
# reference in one process: the same placements on both ranks' batches, gradients accumulated (lr 0 steps), averaged
frozen = torch.optim.SGD(ref.parameters(), lr=0.0)
frozen.zero_grad()
for x, y in data:
    train.sandwich_step(ref, x, y, ce, args, no_amp, None, frozen, step=0)
with torch.no_grad():
    for p in ref.parameters():
        if p.grad is not None:
            p -= lr * p.grad / 2
err = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
assert err < 1e-5, err
assert any(".candidates.attention." in k for k in moved) and any(".candidates.sepconv." in k for k in moved), moved
flat = torch.cat([v.flatten().float() for v in model.state_dict().values()])
both = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(both, flat)
assert torch.equal(both[0], both[1]), "ranks diverged"
print(f"rank {rank} OK max err {err:.2e}, {len(moved)} tensors moved")
dist.destroy_process_group()
""".strip()


@pytest.mark.slow
def test_ddp_sandwich_step_equals_the_averaged_gradient(tmp_path):
    """Two Gloo ranks, a different batch each, one sandwich step (3 placements, DDP no_sync until the last): every
    tensor equals one SGD step on the average of both batches' accumulated gradients, and the ranks agree."""
    script = tmp_path / "ddp_sandwich.py"
    script.write_text(_DDP_SANDWICH)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29542",
                          str(script), os.path.join(REPO, "tools")], env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count(" OK max err ") == 2


@pytest.mark.slow
def test_torchrun_ddp_sandwich_on_cpu(tmp_path):
    """tools/train.py --sandwich under torchrun (two Gloo ranks on CPU): both ranks step the supernet identically."""
    data = tmp_path / "data"
    from metaformer_zoo.data import prepare_digits
    prepare_digits(str(data), size=32)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           os.path.join(REPO, "tools", "train.py"), "--model", "zoo_supernet", "--model-kwargs",
           "dims=[16, 24, 32, 48]", "depths=[1, 1, 2, 1]", "mixers=['pooling', 'sepconv', 'attention']",
           "--sandwich", "1", "--digits-size", "32", "--img-size", "32", "--crop-pct", "1.0", "-b", "16",
           "--lr", "3e-3", "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--max-steps-per-epoch", "6",
           "--seed", "3", "--epochs", "1", "--output", str(out)]
    subprocess.run(cmd, env=dict(os.environ, METAFORMER_ZOO_DATA=str(data), PYTHONPATH=REPO), check=True,
                   timeout=900)
    ckpt = torch.load(out / "last.pth.tar", weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["args"]["sandwich"] == 1 and ckpt["step"] == 6
    model = timm.create_model("zoo_supernet", dims=(16, 24, 32, 48), depths=(1, 1, 2, 1),
                              mixers=("pooling", "sepconv", "attention"), num_classes=10, img_size=32)
    model.load_state_dict(ckpt["state_dict"])  # presets travel with the weights
    assert set(model.presets) >= {"fast", "accurate"}


@pytest.mark.slow
def test_supernet_digits_demonstration(tmp_path):
    """One supernet trained once on digits (--recipe supernet_digits, --sandwich 1); >= 3 placements at >= 95 %
    top-1 and the fastest measurably faster than the most accurate (throughput ratio in the same process)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import placement_search as ps  # noqa: E402
    import train  # noqa: E402
    out = tmp_path / "run"
    train.main(["--recipe", "supernet_digits", "--output", str(out), "--no-progress", "--workers", "0"])
    hub = tmp_path / "hub"
    res = ps.main(["--checkpoint", str(out / "last.pth.tar"), "--space", "stages", "--max-placements", "12",
                   "--plot", str(tmp_path / "pareto.png"), "--write-presets", str(hub), "--threads", "1",
                   "--bench-batch", "256"])
    rows = res["rows"]
    good = [r for r in rows if r["top1"] >= 95.0]
    assert len(good) >= 3, [(ps.short(r["placement"]), r["top1"]) for r in rows]
    best = max(rows, key=lambda r: (r["top1"], -r["img_s"]))
    fastest = max(good, key=lambda r: r["img_s"])
    assert fastest["img_s"] / best["img_s"] > 1.0
    assert os.path.getsize(tmp_path / "pareto.png") > 0
    loaded = timm.create_model(f"local-dir:{hub}", pretrained=True)
    assert loaded.presets == {k: tuple(tuple(s) for s in v) for k, v in res["presets"].items()}
    assert json.loads((hub / "config.json").read_text())["model_args"]["presets"]


@pytest.mark.parametrize("placement", ["fast", MIXED])
def test_dense_backbone_for_two_placements(placement):
    kw = {k: v for k, v in TINY.items() if k not in ("num_classes", "img_size")}
    b = DenseBackbone("zoo_supernet", model_kwargs=dict(kw, placement=placement)).eval()
    actives = [blk.token_mixer.active for s in b.model.stages for blk in s.blocks]
    assert actives == [n for s in _tiny().normalize_placement(placement) for n in s]
    with torch.no_grad():
        outs = b(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 16, 24), (32, 8, 12), (48, 4, 6), (64, 2, 3)]


def test_candidate_kwargs_reach_every_block_and_survive_export():
    """candidate_kwargs configures one candidate in every block (Hydra at a small head size here); export passes them
    on as the plain model's per-block mixer_kwargs, with the same outputs; bad names and keys raise clearly."""
    kw = dict(TINY, mixers=("pooling", "hydra"), candidate_kwargs={"hydra": dict(headdim=8, d_state=8)})
    model = _tiny(**{k: v for k, v in kw.items() if k not in TINY or k == "mixers"})
    for _, _, choice in model._blocks():
        hydra = choice.candidates["hydra"]
        assert hydra.headdim == 8 and hydra.d_state == 8
    x = torch.randn(2, 3, 32, 32)
    placement = [["pooling"], ["hydra"], ["hydra", "pooling"], ["pooling"]]
    model.set_placement(placement)
    plain = model.export(placement).eval()
    assert plain.stages[2].blocks[0].token_mixer.headdim == 8
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
    assert model.export_kwargs(placement)["mixer_kwargs"][2] == [dict(headdim=8, d_state=8), None]
    with pytest.raises(ValueError, match="no stage has as a candidate"):
        _tiny(candidate_kwargs={"ss2d": {}})
    with pytest.raises(TypeError, match="headdimm"):
        _tiny(mixers=("pooling", "hydra"), candidate_kwargs={"hydra": dict(headdimm=8)})

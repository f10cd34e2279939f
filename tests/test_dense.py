"""Dense prediction: backbone adapter, out norms, checkpoint loading, layer decay, mmdet / mmseg configs.

Plain tests need only torch + timm (``metaformer_zoo.dense.core``). Tests marked ``mm`` need the OpenMMLab stack
with compiled mmcv ops (``bash tools/install_mm.sh``); run them with ``pytest -m mm tests/test_dense.py``.

mm selection (to stay within ~25 min on 2 cores): every config in configs/mmdet and configs/mmseg is parsed and
built (params counted, neck / head channels checked against the backbone); one training step (loss + backward) and
one prediction run on a synthetic batch of 2 images (detection 128x160 + 112x150, segmentation 2 x 128x128; half
that for ViM2, whose CPU path is a sequential scan over every token) for the FIRST config of each family and task (``_selected``: one variant per
family x {Mask R-CNN, RetinaNet, Semantic FPN, UperNet}); the other variants of a family (PoolFormer S24/S36/M36/M48)
differ only in depth/width and are build-only. Configs whose model is not registered (a family not merged yet) skip.
"""
import glob
import importlib.util
import os
import re
import time

import pytest
import torch
import torch.nn as nn

import timm
import metaformer_zoo  # noqa: F401
from metaformer_zoo.checkpoint import CheckpointError
from metaformer_zoo.dense import core
from metaformer_zoo.dense.core import DenseBackbone, layer_id_map, resolve_out_norms, strip_prefixes
from metaformer_zoo.spec import FamilySpec, Variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "mmdet", "*.py"))
                 + glob.glob(os.path.join(ROOT, "configs", "mmseg", "*.py")))
TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), token_mixers="identity", downsample_norm="batchnorm2d")


def _model_name(path):
    m = re.search(r"model_name='([^']+)'", open(path).read())
    return m.group(1)


def _task(path):
    base = os.path.basename(path)
    return base.split("_")[0] if not base.startswith("mask-rcnn") else "mask-rcnn"


def _selected():
    """First config (alphabetical) per (task, family)."""
    seen, out = set(), set()
    for p in CONFIGS:
        name = _model_name(p)
        try:
            fam = metaformer_zoo.family_of(name).name
        except ValueError:
            fam = name
        key = (_task(p), fam)
        if key not in seen:
            seen.add(key)
            out.add(p)
    return out


SELECTED = _selected()


def _tiny(**kw):
    return DenseBackbone("zoo_metaformer", model_kwargs=dict(TINY), **kw)


# --- plain tests (no mm) -----------------------------------------------------------------------------------------
def test_configs_cover_every_family():
    """Every catalogued family (but the composed model) has a config per task, named after one of its variants."""
    fams = [f for f in metaformer_zoo.list_families() if f.name != "composed"]
    assert len(fams) >= 14
    for task in ("mask-rcnn", "retinanet", "fpn", "upernet"):
        names = {_model_name(p) for p in CONFIGS if _task(p) == task}
        for fam in fams:
            assert names & set(fam.variants), f"no {task} config for family {fam.name}"


def _gen_tool():
    spec = importlib.util.spec_from_file_location("zoo_gen_dense_configs", os.path.join(ROOT, "tools", "gen_dense_configs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_configs_are_generated_from_the_specs(monkeypatch):
    """The configs on disk are what the generator writes from the catalogue (channels from the models), and a
    family added by a spec alone gets its configs without an entry in the generator's table."""
    gen = _gen_tool()
    assert gen.main(["--check"]) == 0
    fam = metaformer_zoo.family_of("identityformer_s12")
    monkeypatch.delitem(gen.DENSE, "identityformer")
    configs = gen.generate()
    made = {p: t for p, t in configs.items() if "identityformer" in p}
    assert len(made) == 4 and all(fam.variants[0] in p for p in made)
    assert all("in_channels=[64, 128, 320, 512]" in t for t in made.values())


def test_out_norms_official_poolformer_and_retinanet_skip():
    dims = (64, 128, 320, 512)
    norms = resolve_out_norms("poolformer_s12", (0, 1, 2, 3), dims, "official")
    assert all(isinstance(n, nn.GroupNorm) and n.num_groups == 1 and n.eps == 1e-5 for n in norms)
    assert [n.num_channels for n in norms] == list(dims)
    skip = resolve_out_norms("poolformer_s12", (0, 1, 2, 3), dims, "official", out_norm_skip=(0,))
    assert skip[0] is None and all(isinstance(n, nn.GroupNorm) for n in skip[1:])


def test_out_norms_modes():
    dims = (64, 128)
    default = resolve_out_norms("caformer_s18", (2, 3), dims, "official")
    assert all(isinstance(n, timm.layers.LayerNorm2d) and n.eps == 1e-6 for n in default)  # DEFAULT_OUT_NORM
    assert resolve_out_norms("caformer_s18", (2, 3), dims, False) == [None, None]
    gn = resolve_out_norms("caformer_s18", (2, 3), dims, "groupnorm1")
    assert all(isinstance(n, nn.GroupNorm) for n in gn)
    mixed = resolve_out_norms("caformer_s18", (2, 3), dims, [None, "batchnorm2d"])
    assert mixed[0] is None and isinstance(mixed[1], nn.BatchNorm2d) and mixed[1].num_features == 128
    with pytest.raises(ValueError, match="out_norms lists 1 norms"):
        resolve_out_norms("caformer_s18", (2, 3), dims, ["groupnorm1"])
    with pytest.raises(ValueError, match="unknown norm"):
        resolve_out_norms("caformer_s18", (2, 3), dims, "nonsense_norm")


def test_out_norms_family_declarations(monkeypatch):
    """``'official'`` reads the family spec's ``dense_out_norms`` (data, one norm spec per stage)."""
    dims = (32, 64)

    def declare(table):
        spec = FamilySpec("x", (Variant("x"),), owner="timm", dense_out_norms=table)
        monkeypatch.setattr(core, "_family", lambda name: spec)

    declare((None, None))  # the official code has no norm
    assert resolve_out_norms("x", (0, 1), dims, "official") == [None, None]
    forced = resolve_out_norms("x", (0, 1), dims, True)  # True: a norm everywhere, default where the family has none
    assert all(isinstance(n, timm.layers.LayerNorm2d) for n in forced)
    declare(("layernorm2d", None))
    tab = resolve_out_norms("x", (0, 1), dims, "official")
    assert isinstance(tab[0], timm.layers.LayerNorm2d) and tab[1] is None
    declare((dict(type="GroupNorm", num_groups=1, eps=1e-5),) * 2)
    norms = resolve_out_norms("x", (0, 1), dims, "official")
    assert all(isinstance(n, nn.GroupNorm) and n.eps == 1e-5 for n in norms) and norms[1].num_channels == 64
    declare(None)  # nothing declared: the default norm
    assert all(isinstance(n, timm.layers.LayerNorm2d) for n in resolve_out_norms("x", (0, 1), dims, "official"))


def test_strip_prefixes():
    t = torch.zeros(1)
    det = {"backbone.model.stem.conv.weight": t, "backbone.out_norms.0.weight": t, "neck.lateral.weight": t}
    assert set(strip_prefixes(det)) == {"stem.conv.weight", "out_norms.0.weight"}
    cls = {"stem.conv.weight": t, "head.fc.weight": t}
    assert strip_prefixes(cls) == cls
    assert set(strip_prefixes({"encoder.stem.w": t, "other.x": t}, prefix="encoder")) == {"stem.w"}
    with pytest.raises(CheckpointError, match="prefix"):
        strip_prefixes(cls, prefix="backbone.")


def test_adapter_strides_channels_and_padding():
    b = _tiny().eval()
    assert b.out_channels == (16, 32, 48, 64) and b.out_strides == (4, 8, 16, 32)
    with torch.no_grad():
        outs = b(torch.randn(2, 3, 100, 140))
    assert isinstance(outs, tuple) and len(outs) == 4
    for o, c, r in zip(outs, b.out_channels, b.out_strides):
        assert o.shape[:2] == (2, c) and o.shape[2] in (100 // r, -(-100 // r)) and o.shape[3] in (140 // r, -(-140 // r))
    # a family with a divisor gets zero-padded and the maps are cropped back to ceil(H / stride)
    b.input_divisor = 32
    with torch.no_grad():
        outs = b(torch.randn(1, 3, 100, 140))
    assert [tuple(o.shape[2:]) for o in outs] == [(25, 35), (13, 18), (7, 9), (4, 5)]
    sub = _tiny(out_indices=(1, 3)).eval()
    assert sub.out_channels == (32, 64) and len(sub.model.stages) == 4
    sub2 = _tiny(out_indices=(0, 2))
    assert len(sub2.model.stages) == 3  # stage 4 pruned
    with pytest.raises(ValueError, match="out_indices"):
        _tiny(out_indices=(0, 4))


def test_frozen_stages_and_norm_eval():
    b = _tiny(frozen_stages=1, norm_eval=True, out_norms="batchnorm2d")
    b.train()
    frozen = list(b.model.stem.parameters()) + list(b.model.stages[0].parameters()) + \
        list(b.model.stages[1].parameters())
    assert frozen and all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in b.model.stages[2].parameters())
    assert not b.model.stages[1].training and b.model.stages[2].training
    bns = [m for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)  # norm_eval: every BN stays in eval mode
    before = [m.running_mean.clone() for m in bns]
    sum(o.sum() for o in b(torch.randn(2, 3, 64, 64))).backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert all(p.grad is None for p in frozen)
    assert any(p.grad is not None for p in b.model.stages[3].parameters())
    b2 = _tiny(frozen_stages=-1, norm_eval=False).train()
    assert all(m.training for m in b2.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="frozen_stages"):
        _tiny(frozen_stages=4)


def _save(sd, path):
    torch.save(sd, path)
    return str(path)


def test_checkpoint_zoo_official_and_detector_formats(tmp_path):
    src = timm.create_model("identityformer_s12")
    b = DenseBackbone("identityformer_s12", checkpoint=_save(src.state_dict(), tmp_path / "zoo.pth"))
    ref = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(b.model.state_dict()[k], ref[k]) for k in ref)
    # official layout (the family's to_official), wrapped in {'model': ...}
    official = metaformer_zoo.family_of("identityformer_s12").official.to_official(src)
    b2 = DenseBackbone("identityformer_s12", checkpoint=_save({"model": official}, tmp_path / "off.pth"))
    assert all(torch.equal(b2.model.state_dict()[k], ref[k]) for k in ref)
    # a dense checkpoint of the adapter itself (backbone.model.* + out norms), e.g. a trained detector
    with torch.no_grad():
        for p in b2.out_norms.parameters():
            p.add_(0.5)
    det = {f"backbone.{k}": v for k, v in b2.state_dict().items()}
    det["neck.conv.weight"] = torch.zeros(3)
    b3 = DenseBackbone("identityformer_s12", checkpoint=_save(det, tmp_path / "det.pth"))
    assert all(torch.equal(v, b2.state_dict()[k]) for k, v in b3.state_dict().items())


def test_checkpoint_errors(tmp_path):
    wrong = timm.create_model("identityformer_s24").state_dict()
    b = DenseBackbone("identityformer_s12")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(CheckpointError, match="Nothing was loaded"):
        b.load_checkpoint(_save(wrong, tmp_path / "s24.pth"))
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    good = timm.create_model("identityformer_s12").state_dict()
    partial = {k: v for k, v in good.items() if k != "stages.2.blocks.0.mlp.fc1.weight"}
    with pytest.raises(CheckpointError, match="1 missing key"):
        b.load_checkpoint(partial)
    corrupt = tmp_path / "corrupt.pth"
    data = open(_save(good, tmp_path / "good.pth"), "rb").read()
    corrupt.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt"):
        b.load_checkpoint(str(corrupt))
    with pytest.raises(CheckpointError, match="not found"):
        b.load_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="another architecture"):
        b.load_checkpoint("timm:caformer_s18")


def test_poolformer_timm_checkpoint_and_trunk_params(tmp_path):
    src = timm.create_model("poolformer_s12")
    b = DenseBackbone("poolformer_s12", checkpoint=_save(src.state_dict(), tmp_path / "p.pth"))
    # reference/metaformer.md 2.5: trunk-only params; the 4 GroupNorms add 2 * sum(dims)
    assert sum(p.numel() for p in b.model.parameters()) == 11_401_152
    assert sum(p.numel() for p in b.out_norms.parameters()) == 2 * (64 + 128 + 320 + 512)


def test_layer_id_map_monotone():
    b = _tiny()
    ids, n = layer_id_map(b.model)
    assert ids["stem.conv.weight"] == 0
    order = [ids[k] for k, _ in b.model.named_parameters()]
    assert order == sorted(order) and n == max(order) + 1 and n >= 5


_FAST_MODELS = {_model_name(p) for p in SELECTED}
_ODD = [n if n in _FAST_MODELS else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted({_model_name(p) for p in CONFIGS})]


@pytest.mark.parametrize("name", _ODD)
def test_config_models_odd_size(name):
    """Every backbone used by a config: right channels / strides at 100x140 (padded per family rules)."""
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered in this checkout")
    path = next(p for p in CONFIGS if _model_name(p) == name)
    text = open(path).read()
    kwargs = dict(random_mixing_resize=True) if "random_mixing_resize=True" in text else {}
    b = DenseBackbone(name, model_kwargs=kwargs).eval()
    dims = re.search(r"in_channels=\[([\d, ]+)\]", text).group(1)
    assert list(b.out_channels) == [int(d) for d in dims.split(",")], f"{path}: in_channels vs backbone channels"
    with torch.no_grad():
        outs = b(torch.randn(1, 3, 100, 140))
    assert len(outs) == 4 and list(b.out_strides) == [4, 8, 16, 32]
    for o, c, r in zip(outs, b.out_channels, b.out_strides):
        assert o.shape[1] == c and abs(o.shape[2] - 100 / r) < 1 and abs(o.shape[3] - 140 / r) < 1, (name, o.shape)


# --- mm tests ----------------------------------------------------------------------------------------------------
def _mm():
    pytest.importorskip("mmcv.ops")
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")


def _load_cfg(path):
    from mmengine.config import Config
    return Config.fromfile(path)


def _build(cfg, fw):
    from mmengine.registry import DefaultScope
    if fw == "mmdet":
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    else:
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(fw):
        return MODELS.build(cfg.model)


# families whose CPU path is a sequential scan over every token (ViM2's reference selective scan): smaller images
SMALL_IMAGES = ("vim2_",)


def _small(name):
    return name.startswith(SMALL_IMAGES)


def _det_batch(model, with_mask, train, small=False):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    shapes = [(3, 64, 80), (3, 56, 75)] if small else [(3, 128, 160), (3, 112, 150)]
    packed = demo_mm_inputs(batch_size=2, image_shapes=shapes, num_items=[3, 2], num_classes=80, with_mask=with_mask)
    return model.data_preprocessor(packed, train)


def _seg_batch(model, train, small=False):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    inputs, samples = [], []
    size = 64 if small else 128
    for h, w in ((size, size), (size, size)):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w)))
        samples.append(s)
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), train)


@pytest.mark.mm
@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p)[:-3] for p in CONFIGS])
def test_mm_config(path):
    _mm()
    name = _model_name(path)
    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered in this checkout")
    fw = "mmdet" if "/mmdet/" in path else "mmseg"
    cfg = _load_cfg(path)
    assert cfg.custom_imports["imports"] == ["metaformer_zoo.dense"]
    bb = cfg.model.backbone
    assert bb.type == "MetaFormerZooBackbone" and bb.init_cfg["type"] == "Pretrained"
    small = _small(name)
    size = 64 if small else 128
    if fw == "mmseg":
        assert cfg.model.pretrained is None
        cfg.model.data_preprocessor.size = (size, size)  # pad to the test size, not the 512 crop
    t0 = time.time()
    model = _build(cfg, fw)
    backbone = model.backbone
    chans = list(backbone.out_channels)
    if fw == "mmdet":
        assert list(cfg.model.neck.in_channels) == chans
    else:
        key = "decode_head"
        assert list(getattr(cfg.model, key).in_channels) == chans or cfg.model.neck.in_channels == chans
        if "auxiliary_head" in cfg.model:
            assert cfg.model.auxiliary_head.in_channels == chans[2]
    if "retinanet" in path:
        assert isinstance(backbone.out_norms[0], nn.Identity)
    if path not in SELECTED:
        return
    model.train()
    if fw == "mmdet":
        data = _det_batch(model, with_mask="mask-rcnn" in path, train=True, small=small)
    else:
        data = _seg_batch(model, train=True, small=small)
    losses = model(**data, mode="loss")
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in backbone.model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        if fw == "mmdet":
            data = _det_batch(model, with_mask="mask-rcnn" in path, train=False, small=small)
        else:
            data = _seg_batch(model, train=False, small=small)
        preds = model(**data, mode="predict")
    assert len(preds) == 2
    if fw == "mmdet":
        assert hasattr(preds[0], "pred_instances")
    else:
        assert preds[0].pred_sem_seg.data.shape[-2:] == (size, size)
    print(f"{os.path.basename(path)}: {time.time() - t0:.1f}s")


@pytest.mark.mm
def test_mm_backbone_registry_and_init_cfg_errors(tmp_path):
    pytest.importorskip("mmengine")
    from mmengine.registry import MODELS
    import metaformer_zoo.dense  # noqa: F401
    good = timm.create_model("identityformer_s12").state_dict()
    path = _save(good, tmp_path / "good.pth")
    b = MODELS.build(dict(type="MetaFormerZooBackbone", model_name="identityformer_s12",
                          init_cfg=dict(type="Pretrained", checkpoint=path)))
    b.init_weights()
    assert torch.equal(b.model.stem.conv.weight, good["stem.conv.weight"])
    wrong = _save(timm.create_model("identityformer_s24").state_dict(), tmp_path / "wrong.pth")
    b = MODELS.build(dict(type="MetaFormerZooBackbone", model_name="identityformer_s12",
                          init_cfg=dict(type="Pretrained", checkpoint=wrong)))
    with pytest.raises(CheckpointError, match="does not fit the identityformer_s12 backbone"):
        b.init_weights()
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(open(path, "rb").read()[:1000])
    b = MODELS.build(dict(type="MetaFormerZooBackbone", model_name="identityformer_s12",
                          init_cfg=dict(type="Pretrained", checkpoint=str(corrupt))))
    with pytest.raises(CheckpointError, match="corrupt"):
        b.init_weights()
    # through a whole segmentor: the top-level init_weights() (what the mmengine Runner calls) loads it strictly
    _mm()
    cfg = _load_cfg(os.path.join(ROOT, "configs", "mmseg", "fpn_identityformer_s12_8xb4-40k_ade20k-512x512.py"))
    cfg.model.backbone.init_cfg.checkpoint = path
    seg = _build(cfg, "mmseg")
    seg.init_weights()
    assert all(torch.equal(seg.backbone.model.state_dict()[k], v) for k, v in good.items() if not k.startswith("head."))
    # resolves from the mmdet / mmseg scopes through the root registry
    from mmengine.registry import DefaultScope
    for scope in ("mmdet", "mmseg"):
        with DefaultScope.overwrite_default_scope(scope):
            assert MODELS.get("MetaFormerZooBackbone") is type(b)


@pytest.mark.mm
def test_mm_layer_decay_constructor():
    _mm()
    from mmengine.optim import build_optim_wrapper
    cfg = _load_cfg(os.path.join(ROOT, "configs", "mmseg", "fpn_poolformer_s12_8xb4-40k_ade20k-512x512.py"))
    cfg.model.backbone.model_name = "zoo_metaformer"
    cfg.model.backbone.model_kwargs = dict(TINY)
    cfg.model.neck.in_channels = [16, 32, 48, 64]
    model = _build(cfg, "mmseg")
    ow = build_optim_wrapper(model, dict(
        type="OptimWrapper", constructor="MetaFormerZooLayerDecayOptimizerConstructor",
        optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05), paramwise_cfg=dict(layer_decay_rate=0.5)))
    ids, n = layer_id_map(model.backbone.model)
    lr_of = {}
    for g in ow.optimizer.param_groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    for name, p in model.named_parameters():
        lr, wd = lr_of[id(p)]
        if name.startswith("backbone.model."):
            assert lr == pytest.approx(1e-3 * 0.5 ** (n - ids[name[len("backbone.model."):]]))
        else:
            assert lr == pytest.approx(1e-3)
        assert wd == (0.0 if p.ndim == 1 else 0.05)
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)


def test_import_zoo_does_not_import_dense_or_mm():
    import subprocess
    import sys
    code = ("import sys, metaformer_zoo; bad = [m for m in ('metaformer_zoo.dense', 'mmengine', 'mmdet', 'mmseg', "
            "'mmcv') if m in sys.modules]; assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)

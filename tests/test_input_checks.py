"""Input checks on every path into the trunk, and no silently ignored mixer kwargs (issue 11, items 5 and 6).

The input check is the trunk's first module (``MetaFormerBase.input_check``), so it runs for ``forward``,
``forward_features``, ``forward_intermediates`` and every timm ``features_only`` wrapper (FeatureListNet /
FeatureDictNet call the children in order, FeatureGetterNet calls ``forward_intermediates``, FeatureHookNet the model or
its children, FeatureGraphNet an FX graph that keeps the check), scripted models included. Mixer kwargs must be named
parameters of the mixer's constructor.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import create_feature_extractor, get_graph_node_names
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet

import metaformer_zoo  # noqa: F401  (registers the zoo models)
from metaformer_zoo.mixers import create_mixer, list_mixers
from metaformer_zoo.skeleton import InputCheck
from metaformer_zoo.zoo import count_params, list_families, zoo_registered_models

_ZOO = zoo_registered_models()


def _smallest(family) -> str:
    names = [v for v in family.variants if v in _ZOO]
    return min(names, key=lambda n: count_params(timm.create_model(n, device="meta"))[0])


SMALLEST = sorted(_smallest(f) for f in list_families() if f.owner == "zoo")

TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), img_size=64)
BAD_INPUTS = [
    ((1, 2, 64, 64), r"built for 3 input channels but got 2 \(input shape \[1, 2, 64, 64\]\).*in_chans=2"),
    ((3, 64, 64), r"expects a 4-D \(B, C, H, W\) image batch, got shape \[3, 64, 64\]"),
    ((1, 3, 16, 16), r"input 16x16 is too small for .*the minimum is 32x32"),
]


def _create(name, **kwargs):
    """The model on the meta device: the checks look at shapes only and raise before any compute."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs.setdefault("img_size", 64)  # RandFormer's frozen mixing matrices are built for the test size
    return timm.create_model(name, device="meta", **kwargs).eval()


def _assert_rejects(fn, arch: str, device: str = "meta"):
    for shape, msg in BAD_INPUTS:
        with pytest.raises(ValueError, match=msg) as info:
            fn(torch.randn(*shape, device=device))
        assert arch in str(info.value), (shape, str(info.value))


@pytest.mark.parametrize("name", SMALLEST)
def test_every_path_checks_input(name):
    """forward, forward_features, forward_intermediates and the default features_only wrapper, for every family."""
    model = _create(name)
    arch = model.arch_name
    assert next(iter(model.named_children()))[0] == "input_check"  # first child: feature wrappers run it first
    fmodel = _create(name, features_only=True)
    for m in (model, fmodel):
        assert not [k for k in m.state_dict() if "input_check" in k]  # the check adds no state
    ok = torch.randn(1, 3, 64, 64, device="meta")
    checks = [m for m in fmodel.modules() if isinstance(m, InputCheck)]  # FeatureGetterNet keeps it in .model
    assert len(checks) == 1 and checks[0](ok) is ok and model.input_check(ok) is ok
    with torch.no_grad():
        for fn in (model, model.forward_features, fmodel,
                   lambda x: model.forward_intermediates(x, intermediates_only=True)):
            _assert_rejects(fn, arch)


@pytest.mark.parametrize("name", ["zoo_metaformer", "vim2_tiny"])
def test_fx_paths_keep_the_check(name):
    """Dead-code elimination in FX feature extraction must not drop the (output-less) check."""
    model = _create(name)
    graph_net = _create(name, features_only=True, feature_cls="fx")
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        for fn in (graph_net, extractor):
            _assert_rejects(fn, model.arch_name)


def test_scripted_features_only_checks_input():
    with timm.layers.set_layer_config(scriptable=True):
        fmodel = timm.create_model("zoo_metaformer", features_only=True, **TINY).eval()
    scripted = torch.jit.script(fmodel)
    with torch.no_grad():
        for shape, msg in BAD_INPUTS:
            with pytest.raises(Exception, match=msg):  # TorchScript re-raises the ValueError as torch.jit.Error
                scripted(torch.randn(*shape))
        x = torch.randn(1, 3, 64, 64)
        for a, b in zip(scripted(x), fmodel(x)):
            torch.testing.assert_close(a, b)


def test_size_rules_reach_every_feature_wrapper():
    """``input_divisor`` / ``min_input_size`` set on the model are what every wrapper checks (the dense adapter and
    fixed-grid families rely on them)."""
    model = timm.create_model("zoo_metaformer", **TINY).eval()
    model.input_divisor = 32
    assert model.input_divisor == model.input_check.divisor == 32
    wrappers = [
        FeatureListNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3), flatten_sequential=True),
        FeatureDictNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3), flatten_sequential=True),
        FeatureGetterNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3)),
        FeatureHookNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3), flatten_sequential=True),
        FeatureHookNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3), no_rewrite=True),
    ]
    with torch.no_grad():
        for w in wrappers:
            with pytest.raises(ValueError, match=r"input 48x70 does not work with MetaFormer.*multiples of 32.*64x96"):
                w(torch.randn(1, 3, 48, 70))
            assert len(w(torch.randn(1, 3, 64, 96))) == 4
        model.input_divisor = 1
        model.min_input_size = 96
        fm = FeatureListNet(model, out_indices=(0, 1, 2, 3), flatten_sequential=True)
        with pytest.raises(ValueError, match="input 64x64 is too small for MetaFormer: the minimum is 96x96"):
            fm(torch.randn(1, 3, 64, 64))


# --- mixer kwargs -----------------------------------------------------------------------------------------------------


def test_misspelt_mixer_kwarg_raises():
    with pytest.raises(TypeError, match=r"token mixer 'pooling' \(stage 0, one mixer_kwargs dict for every stage\) "
                                        r"got unknown kwarg\(s\) 'pool_sizee'; it accepts: pool_size\."):
        timm.create_model("zoo_metaformer", token_mixers=["pooling", "pooling", "attention", "attention"],
                          mixer_kwargs=dict(pool_sizee=5), **TINY)
    with pytest.raises(TypeError, match=r"'sepconv' \(stage 1\) got unknown kwarg\(s\) 'kernel_sise', 'biass'; "
                                        r"it accepts: .*bias, kernel_size, padding"):
        timm.create_model("zoo_metaformer", token_mixers=["pooling", "sepconv", "attention", "attention"],
                          mixer_kwargs=[None, dict(kernel_sise=5, biass=True), None, None], **TINY)
    # the correct spelling reaches the mixer; context the mixer does not name (feat_size, proj_drop ...) is not passed
    model = timm.create_model("zoo_metaformer", token_mixers="pooling", mixer_kwargs=dict(pool_size=5), **TINY)
    assert all(s.blocks[0].token_mixer.pool.kernel_size == 5 for s in model.stages)


def test_family_entrypoints_reject_unknown_mixer_kwargs():
    with pytest.raises(TypeError, match=r"'identity' \(stage 0.*'foo'; it accepts: no kwargs"):
        timm.create_model("identityformer_s12", mixer_kwargs=dict(foo=1))
    with pytest.raises(TypeError, match=r"'random' \(stage 2\) got unknown kwarg\(s\) 'resise'; "
                                        r"it accepts: feat_size, resize"):
        timm.create_model("randformer_s12", img_size=64, mixer_kwargs=(None, None, dict(resise=True), None))
    model = timm.create_model("randformer_s12", img_size=64, random_mixing_resize=True)
    assert model.stages[3].blocks[0].token_mixer.resize


def test_mixer_kwargs_structure_errors():
    with pytest.raises(TypeError, match=r"'attention' \(stage 2\): 'dim' is set by the model"):
        timm.create_model("zoo_metaformer", mixer_kwargs=[None, None, dict(dim=8), None], **TINY)
    with pytest.raises(TypeError, match=r"mixer_kwargs\[1\] must be a dict .* got int: 3"):
        timm.create_model("zoo_metaformer", mixer_kwargs=[None, 3, None, None], **TINY)


def test_no_registered_mixer_swallows_unknown_kwargs():
    for name in list_mixers():
        with pytest.raises(TypeError, match=rf"token mixer '{name}' got unknown kwarg\(s\) 'not_an_option'"):
            create_mixer(name, 64, context=dict(feat_size=(4, 4), stage_idx=0), not_an_option=1)


def test_create_mixer_with_user_class_and_factory():
    class Swallow(nn.Module):  # timm-style mixer: **kwargs swallows what it does not use
        def __init__(self, dim, scale: float = 1., **kwargs):
            super().__init__()
            self.scale = scale

    with pytest.raises(TypeError, match=r"Swallow got unknown kwarg\(s\) 'scael'; it accepts: scale"):
        create_mixer(Swallow, 8, scael=2.)
    assert create_mixer(Swallow, 8, context=dict(feat_size=(2, 2)), scale=2.).scale == 2.
    # the raft factory names drop_path instead of forwarding **kwargs
    raft = create_mixer("raft", 8, context=dict(feat_size=(4, 4)), drop_path=0.1)
    assert raft.drop_path.drop_prob == 0.1

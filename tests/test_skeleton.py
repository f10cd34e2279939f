"""The shared skeleton: mixer composition across stages, bad-input errors, no_weight_decay, group_matcher."""
import pytest
import timm
import torch
import torch.nn as nn

import metaformer_zoo
from metaformer_zoo import MetaFormer
from metaformer_zoo.mixers import create_mixer, list_mixers, register_mixer
from metaformer_zoo.zoo import count_params


def test_compose_mixers_per_stage():
    model = timm.create_model(
        "zoo_metaformer", token_mixers=["pooling", "sepconv", "attention", "random"], depths=(1, 1, 2, 1),
        dims=(16, 32, 48, 64), img_size=64, num_classes=5).eval()
    kinds = [type(s.blocks[0].token_mixer).__name__ for s in model.stages]
    assert kinds == ["Pooling", "SepConv", "Attention2d", "RandomMixing"]
    assert model.stages[3].blocks[0].token_mixer.random_matrix.shape == (4, 4)  # 64 px -> 2x2 tokens at stride 32
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_every_registered_mixer_composes():
    """Each registered mixer works in a 2D stage of the generic skeleton (shape in == shape out, grads flow)."""
    for name in list_mixers():
        model = timm.create_model("zoo_metaformer", token_mixers=name, depths=(1, 1, 1, 1), dims=(64, 128, 192, 256),
                                  img_size=64, num_classes=3)
        out = model(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 3), name
        out.sum().backward()


def test_user_mixer_class_and_registration():
    class Shift(nn.Module):
        def __init__(self, dim, stage_idx=None):
            super().__init__()
            self.stage_idx = stage_idx
            self.proj = nn.Conv2d(dim, dim, 1)

        def forward(self, x):
            return self.proj(torch.roll(x, 1, dims=-1))

    model = MetaFormer(depths=(1, 1), dims=(8, 16), token_mixers=[Shift, "identity"], num_classes=2,
                       res_scale_init_values=None)
    assert model.stages[0].blocks[0].token_mixer.stage_idx == 0  # context passed only because Shift names it
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    register_mixer("test_shift_mixer", Shift)
    assert isinstance(create_mixer("test_shift_mixer", 8, context=dict(stage_idx=3)), Shift)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("test_shift_mixer", nn.Identity)


def test_stage_lists_must_match_depths():
    with pytest.raises(ValueError, match="token_mixers has 3 entries but the model has 4 stages"):
        MetaFormer(token_mixers=["pooling"] * 3)
    with pytest.raises(ValueError, match="unknown token mixer 'nope'"):
        MetaFormer(token_mixers="nope")
    with pytest.raises(ValueError, match="unknown norm layer"):
        MetaFormer(norm_layers="nonorm")


@pytest.mark.parametrize("name", ["identityformer_s12", "zoo_metaformer"])
def test_bad_input_errors(name):
    model = timm.create_model(name, depths=(1, 1, 1, 1)).eval()
    with pytest.raises(ValueError, match="built for 3 input channels but got 1.*in_chans=1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="too small.*minimum is 32x32"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        model.forward_intermediates(torch.randn(1, 3, 8, 8))
    # in_chans=1 models take 1-channel input
    assert timm.create_model(name, depths=(1, 1, 1, 1), in_chans=1, num_classes=2)(torch.randn(1, 1, 64, 64)).shape == (1, 2)


def test_divisor_error_message():
    model = MetaFormer(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    model.input_divisor = 32
    with pytest.raises(ValueError, match="multiples of 32.*64x96"):
        model(torch.randn(1, 3, 50, 70))


def test_no_weight_decay_and_group_matcher():
    model = timm.create_model("identityformer_s12")
    nwd = model.no_weight_decay()
    assert "stages.2.blocks.0.res_scale1.scale" in nwd and "stages.0.blocks.0.norm1.weight" not in nwd
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == sum((2, 2, 6, 2)) + 2  # stem, one per block (downsample joins its stage's first), head
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.8 ** 13)
    rand = timm.create_model("randformer_s12")
    opt = create_optimizer_v2(rand, "adamw", lr=1e-3)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == count_params(rand)[1]  # frozen random matrices are not optimised


@pytest.mark.parametrize("name,table", [("iformer_small", "pos_embed"), ("transxnet_t", "relative_pos_enc")])
def test_group_matcher_stage_tables(name, table):
    """Per-stage tables outside the blocks are grouped with the stage's downsampling by the skeleton's matcher."""
    from timm.models import group_parameters
    model = timm.create_model(name)
    assert type(model).group_matcher is metaformer_zoo.skeleton.MetaFormerBase.group_matcher
    groups = group_parameters(model, model.group_matcher())
    group_of = {n: gid for gid, names in groups.items() for n in names}
    assert len(group_of) == len(dict(model.named_parameters()))  # every parameter is in a group
    for i in (1, 2, 3):
        tables = [n for n in group_of if n.startswith(f"stages.{i}.{table}")]
        down = [n for n in group_of if n.startswith(f"stages.{i}.downsample.")]
        assert tables and down
        assert {group_of[n] for n in tables + down} == {group_of[f"stages.{i}.blocks.0.norm1.weight"]}
    assert group_of["stem." + next(n for n, _ in model.stem.named_parameters())] == 0


def test_head_variants():
    x = torch.randn(2, 3, 64, 64)
    mlp = MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), head_mlp_ratio=4, head_dropout=0.5, num_classes=4)
    assert mlp.head.fc.fc1.out_features == 128 and mlp.head.fc.norm.eps == 1e-5
    assert mlp.eval()(x).shape == (2, 4)
    first = MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), head_norm_first=True, output_norm="groupnorm1",
                       num_classes=4).eval()
    assert first(x).shape == (2, 4)
    first.reset_classifier(0, "")
    assert first(x).shape == (2, 32, 2, 2)


def test_per_block_mixer_kwargs():
    """A stage's mixer_kwargs entry may list one dict per block (beside per-block token_mixers); lengths and keys are
    checked per block."""
    kw = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), img_size=64, num_classes=3)
    m = MetaFormer(token_mixers=["pooling", "pooling", ["pooling", "sepconv"], "pooling"],
                   mixer_kwargs=[None, None, [dict(pool_size=5), dict(kernel_size=3)], None], **kw)
    assert m.stages[2].blocks[0].token_mixer.pool.kernel_size == 5
    assert m.stages[2].blocks[1].token_mixer.dwconv.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="lists 1 per-block dicts but stage 2 has 2 blocks"):
        MetaFormer(mixer_kwargs=[None, None, [dict(pool_size=5)], None], **kw)
    with pytest.raises(TypeError, match="stage 2 block 1"):
        MetaFormer(token_mixers=["pooling", "pooling", ["pooling", "sepconv"], "pooling"],
                   mixer_kwargs=[None, None, [dict(pool_size=5), dict(pool_size=3)], None], **kw)

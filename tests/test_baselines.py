"""IdentityFormer, RandFormer and the composed zoo_metaformer: exact official parameter counts and MACs, checkpoint
conversion, RandFormer size, and their family declarations (FamilySpec)."""
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import perturb

import metaformer_zoo
from metaformer_zoo import hub, zoo
from metaformer_zoo.checkpoint import CheckpointError
from metaformer_zoo.dense.core import resolve_out_norms
from metaformer_zoo.models import _baselines, identityformer, randformer, zoo_metaformer
from metaformer_zoo.models._baselines import checkpoint_filter_fn, official_state_dict
from metaformer_zoo.skeleton import MetaFormer
from metaformer_zoo.zoo import count_frozen_buffers, count_macs, count_params

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"identityformer": identityformer, "randformer": randformer, "composed": zoo_metaformer}

# reference/metaformer.md section 2.2 (measured on the official sail-sg/metaformer code)
PARAMS = {
    "s12": 11_891_712, "s24": 21_341_464, "s36": 30_791_216, "m36": 56_077_168, "m48": 73_346_056,
}
FROZEN = {"s12": 235_298, "s24": 470_596, "s36": 705_894, "m36": 705_894, "m48": 941_192}
TRUNK = {"s12": 11_377_688, "s24": 20_827_440, "s36": 30_277_192, "m36": 55_306_632, "m48": 72_575_520}


@pytest.mark.parametrize("size", list(PARAMS))
def test_param_counts(size):
    total, trainable = count_params(timm.create_model(f"identityformer_{size}", device="meta"))
    assert total == trainable == PARAMS[size]
    total, trainable = count_params(timm.create_model(f"randformer_{size}", device="meta"))
    assert trainable == PARAMS[size] and total == PARAMS[size] + FROZEN[size]
    fm = timm.create_model(f"identityformer_{size}", features_only=True, device="meta")
    assert count_params(fm)[0] == TRUNK[size]


def test_macs_match_reference():
    assert count_macs(timm.create_model("identityformer_s12", device="meta"), device="meta") == 1_812_267_008
    assert count_macs(timm.create_model("randformer_s12", device="meta"), device="meta") == 1_888_484_352


def test_random_matrices_are_frozen_row_stochastic_and_distinct():
    m = timm.create_model("randformer_s12")
    mats = [b.token_mixer.random_matrix for b in m.stages[2].blocks]
    assert all(not r.requires_grad and r.shape == (196, 196) for r in mats)
    torch.testing.assert_close(mats[0].sum(-1), torch.ones(196))
    assert not torch.equal(mats[0], mats[1])
    assert m.stages[3].blocks[0].token_mixer.random_matrix.shape == (49, 49)


def test_random_matrices_are_buffers_every_parameter_gets_a_gradient():
    """timm's test_model_backward: every parameter gets a gradient. The frozen matrices are persistent buffers
    (same state-dict keys as the official parameters), counted apart by count_frozen_buffers."""
    torch.manual_seed(0)
    m = timm.create_model("randformer_s12", num_classes=7, img_size=64).train()  # 4x4 / 2x2 tokens in stages 3 / 4
    key = "stages.2.blocks.0.token_mixer.random_matrix"
    assert key in dict(m.named_buffers()) and key not in dict(m.named_parameters()) and key in m.state_dict()
    m(torch.randn(2, 3, 64, 64)).mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    assert count_frozen_buffers(m) == 6 * 16 ** 2 + 2 * 4 ** 2
    assert count_frozen_buffers(timm.create_model("randformer_s12", device="meta")) == FROZEN["s12"]
    assert m.to(torch.bfloat16).stages[3].blocks[0].token_mixer.random_matrix.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["identityformer_s12", "randformer_s12"])
def test_official_checkpoint_converts_strictly(name, tmp_path):
    torch.manual_seed(0)
    src = perturb(timm.create_model(name))  # norms / scales / StarReLU / random matrices off their init values
    official = official_state_dict(src)
    # official layout facts: NHWC Linear MLP weights, downsample_layers.* naming, plain state dict
    assert official["stages.0.0.mlp.fc1.weight"].dim() == 2
    assert "downsample_layers.0.post_norm.weight" in official and "head.weight" in official
    path = tmp_path / "official.pth"
    torch.save(official, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))
    # the same file through a 10-class model keeps the trunk and re-initialises the head
    m10 = timm.create_model(name, pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(m10.stem.conv.weight, src.stem.conv.weight)


def test_mismatched_checkpoints_fail_loudly():
    model = timm.create_model("identityformer_s12")
    official = official_state_dict(model)
    broken = dict(official)
    broken.pop("stages.1.0.norm1.weight")
    broken["stages.1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="missing key.*\n.*unexpected key"):
        checkpoint_filter_fn(broken, model)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        checkpoint_filter_fn(official_state_dict(timm.create_model("identityformer_m36")), model)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        checkpoint_filter_fn({"conv1.weight": torch.zeros(1)}, model)
    with pytest.raises(CheckpointError, match="mis-shaped"):  # RandFormer matrices of another img_size
        checkpoint_filter_fn(official_state_dict(timm.create_model("randformer_s12", img_size=64)),
                             timm.create_model("randformer_s12"))


def test_randformer_size_is_fixed_unless_resize_requested():
    model = timm.create_model("randformer_s12").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        assert model(torch.randn(1, 3, 211, 211)).shape == (1, 1000)  # same token grid, as the official code
        with pytest.raises(ValueError, match="random_mixing_resize=True"):
            model(torch.randn(1, 3, 256, 256))
    resized = timm.create_model("randformer_s12", random_mixing_resize=True).eval()
    resized.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(resized(x), model(x))  # exact at the built size
        feats = resized.forward_intermediates(torch.randn(1, 3, 256, 320), intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(64, 80), (32, 40), (16, 20), (8, 10)]
    r = resized.stages[2].blocks[0].token_mixer._matrix_for(16, 20)
    torch.testing.assert_close(r.sum(-1), torch.ones(320))


def test_identity_mixer_branch_is_not_skipped():
    """IdentityFormer blocks add norm1(x): a zero norm1 weight must change the output."""
    model = timm.create_model("identityformer_s12").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.stages[0].blocks[0].norm1.weight.zero_()
        assert not torch.allclose(model(x), ref)


def test_pretrained_without_known_weights_is_an_error():
    with pytest.raises(ValueError, match="no pretrained weights are known for zoo_metaformer"):
        timm.create_model("zoo_metaformer", pretrained=True)


@pytest.mark.parametrize("family", list(SPECS))
def test_spec_declares_the_official_numbers(family):
    """Each family is one FamilySpec in its module, registered in the catalogue, with the official params / MACs of
    catalogue.json and the top-1 of results.csv on every variant."""
    spec = SPECS[family].SPEC
    assert zoo.family_of(spec.variants[0]) is spec and spec.model_cls is MetaFormer
    rows, results = zoo.load_catalogue(), hub.official_results()
    for v in spec.models:
        row = rows[v.name]
        assert (v.params, v.frozen_params, v.macs) == (row["params"], row["frozen_buffers"], row["macs"]), v.name
        assert (v.top1, v.top1_source) == (results[v.name] if v.name in results else (None, "")), v.name
        assert timm.models.model_entrypoint(v.name).__module__ == SPECS[family].__name__
    small = spec.models[0]  # the declaration builds the model it describes
    assert count_params(timm.create_model(small.name, device="meta"))[0] == small.params


@pytest.mark.parametrize("family", list(SPECS))
def test_spec_identity_recipe_and_card(family):
    spec = SPECS[family].SPEC
    assert spec.citation == _baselines.CITATION and spec.arxiv == "2210.13452"
    recipe = yaml.safe_load((ROOT / "configs" / "train" / f"{spec.recipe}.yaml").read_text())
    assert recipe["model"] in spec.variants
    assert set(recipe.get("variants", {})) <= set(spec.variants)
    if family == "composed":
        return
    assert set(recipe["variants"]) == set(spec.variants)
    card = (ROOT / "model_cards" / f"{spec.card}.md").read_text()
    bibtex = re.search(r"```bibtex\n(.*?)\n```", card, re.S).group(1)
    assert bibtex == spec.citation
    for v in spec.models:
        assert v.tags == {"sail_in1k": {"url": _baselines.official_url(family, v.name)}}


@pytest.mark.parametrize("name", ["identityformer_s12", "randformer_s12"])
def test_dense_out_norms_are_the_adapter_default(name):
    """sail-sg/metaformer has no dense code: nothing is declared and every output gets LayerNorm2d (eps 1e-6)."""
    assert zoo.family_of(name).dense_out_norms is None
    norms = resolve_out_norms(name, (0, 1, 2, 3), (64, 128, 320, 512))
    assert [(type(n).__name__, n.eps, n.normalized_shape) for n in norms] == [
        ("LayerNorm2d", 1e-6, (d,)) for d in (64, 128, 320, 512)]


def test_random_mixing_resize_reaches_the_mixers():
    model = timm.create_model("randformer_s12", random_mixing_resize=True, device="meta")
    assert [b.token_mixer.resize for s in model.stages[2:] for b in s.blocks] == [True] * 8
    fixed = timm.create_model("randformer_s12", device="meta")
    assert not any(b.token_mixer.resize for s in fixed.stages[2:] for b in s.blocks)
    own = timm.create_model("randformer_s12", random_mixing_resize=True, device="meta",
                            mixer_kwargs=(None, None, None, dict(resize=True)))  # explicit mixer_kwargs win
    assert not own.stages[2].blocks[0].token_mixer.resize and own.stages[3].blocks[0].token_mixer.resize

"""configs/train recipes of the timm-owned families parse through tools/train.py with their per-variant overrides."""
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # recipe: {variant: (opt, lr_base, lr_base_size, warmup_epochs, drop_path)}  from the official scripts
    "poolformer": {"poolformer_s12": ("adamw", 1e-3, 1024, 5, 0.1), "poolformer_m48": ("adamw", 1e-3, 1024, 5, 0.4)},
    "poolformerv2": {"poolformerv2_s12": ("adamw", 4e-3, 4096, 5, 0.1),
                     "poolformerv2_m48": ("adamw", 4e-3, 4096, 5, 0.4)},
    "convformer": {"convformer_s18": ("adamw", 4e-3, 4096, 20, 0.2), "convformer_b36": ("adamw", 4e-3, 4096, 20, 0.6)},
    "caformer": {"caformer_s18": ("lamb", 8e-3, 4096, 20, 0.15), "caformer_b36": ("lamb", 8e-3, 4096, 20, 0.6)},
    "mambaout": {"mambaout_femto": ("adamw", 4e-3, 4096, 20, 0.025), "mambaout_base": ("adamw", 4e-3, 4096, 20, 0.6)},
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_values(recipe):
    data = yaml.safe_load((ROOT / "configs" / "train" / f"{recipe}.yaml").read_text())
    import timm

    import metaformer_zoo  # noqa: F401
    from metaformer_zoo import zoo
    assert set(data["variants"]) == set(zoo.list_variants(recipe))
    assert all(timm.models.is_model(v) for v in data["variants"])
    train_py = ROOT / "tools" / "train.py"
    if not train_py.is_file():
        pytest.skip("tools/train.py not in this checkout")
    spec = importlib.util.spec_from_file_location("zoo_train_cli", train_py)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    for variant, (opt, lr_base, lr_base_size, warmup, dp) in RECIPES[recipe].items():
        args = train.parse_args(["--recipe", recipe, "--model", variant])
        assert (args.opt, args.lr_base, args.lr_base_size, args.warmup_epochs) == (opt, lr_base, lr_base_size, warmup)
        assert args.drop_path == dp and args.epochs == 300 and args.weight_decay == 0.05

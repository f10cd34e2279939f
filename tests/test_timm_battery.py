"""What timm's TorchScript tests need from the zoo, checked piece by piece (``tests/test_battery.py`` runs the
battery itself over every model).

* timm's ``test_model_forward_fx_torchscript`` scripts the FX graph, so every leaf function the zoo registers with
  ``register_notrace_function`` must compile;
* a scripted model calls the kernel ops through their registered ``torch.ops.metaformer_zoo`` entries: outputs and
  gradients must equal the eager kernel wrappers';
* a scripted model trains (autograd through the ops) and, where every op is a registered one, survives
  ``torch.jit.save`` / ``torch.jit.load``.
"""
import io

import pytest
import timm
import torch
from timm.models import get_notrace_functions

import metaformer_zoo  # noqa: F401  (registers the models and the kernel ops)
from metaformer_zoo.kernels.fft_filter import fft_filter
from metaformer_zoo.kernels.strip_mix import strip_mix
from metaformer_zoo.mixers.affnet import aff_filter
from metaformer_zoo.mixers.strip import strip_mix_op


def _zoo_leaf_functions():
    """The FX leaf functions of the zoo's models and mixers (the kernel package's own wrappers are not FX leaves of
    any zoo model: the mixers call them through scriptable functions)."""
    fns = [f for f in get_notrace_functions()
           if f.__module__.startswith("metaformer_zoo.") and not f.__module__.startswith("metaformer_zoo.kernels")]
    return sorted(fns, key=lambda f: (f.__module__, f.__name__))


def test_zoo_registers_fx_leaf_functions():
    names = {f.__name__ for f in _zoo_leaf_functions()}
    assert {"aff_filter", "strip_mix_op", "resample_to", "resize_strip_weight", "pad_to_even"} <= names


@pytest.mark.parametrize("fn", _zoo_leaf_functions(), ids=lambda f: f"{f.__module__.split('.')[-1]}.{f.__name__}")
def test_fx_leaf_function_scripts(fn):
    assert isinstance(torch.jit.script(fn), torch.jit.ScriptFunction)


@pytest.mark.parametrize("axis,raft_size,groups,window,with_bias", [
    ("h", 2, 1, 1, True),  # RaftMLP token MLP: (1, e r L, r L, 1)
    ("w", 1, 4, 3, True),  # Strip-MLP proj_h: (G, W, W, 3)
    ("h", 1, 2, 3, False),
])
def test_scripted_strip_mix_op_matches_kernel(axis, raft_size, groups, window, with_bias):
    torch.manual_seed(0)
    B, C, H, W = 2, 8, 5, 6
    L = H if axis == "h" else W
    r_out = 2 * raft_size if window == 1 else 1
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(groups, r_out * L, raft_size * L, window, dtype=torch.float64, requires_grad=True)
    b = torch.randn(groups, r_out * L, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (x, w, b) if t is not None]

    ref = strip_mix(x, w, b, axis, raft_size)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    scripted = torch.jit.script(strip_mix_op)
    out = scripted(x, w, b, axis, raft_size, "auto")
    grads = torch.autograd.grad(out.square().sum(), inputs)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_scripted_aff_filter_matches_kernel():
    torch.manual_seed(0)
    G, bs = 2, 4
    x = torch.randn(2, G * bs, 6, 5, dtype=torch.float64, requires_grad=True)
    ws = [(0.3 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()
          for shape in ((2, G, bs, bs), (2, G, bs), (2, G, bs, bs), (2, G, bs))]
    ref = fft_filter(x, *ws, num_groups=G, sparsity_threshold=0.01, act="silu")
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + ws)
    out = torch.jit.script(aff_filter)(x, *ws, G, 0.01, "silu", "auto")
    grads = torch.autograd.grad(out.square().sum(), [x] + ws)
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def _scripted_pair(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.)
    with timm.layers.set_layer_config(scriptable=True):
        smodel = timm.create_model(name, num_classes=5, drop_path_rate=0.)
    smodel.load_state_dict(model.state_dict())
    return model, torch.jit.script(smodel)


def _slow(*names):
    return [pytest.param(n, marks=pytest.mark.slow) for n in names]


# the smallest variant of each family that was not scriptable before (the heavier ones in the slow stage); ViM2's
# scripted scan calls are Python calls
@pytest.mark.parametrize("name", ["affnet_et", "raftmlp_s"] + _slow("stripmlp_light_t", "vim2_tiny"))
def test_scripted_model_trains_like_eager(name):
    """Same gradients in float64 (the eager reference paths may run a different but equal formula, e.g. Strip-MLP's
    strip projection as a convolution under autograd vs the scripted custom op: float32 rounding then differs)."""
    model, scripted = _scripted_pair(name)
    model.double().train()
    scripted.double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).logsumexp(-1).sum().backward()
    scripted(x).logsumexp(-1).sum().backward()
    grads = dict(scripted.named_parameters())
    for n, p in model.named_parameters():
        assert grads[n].grad is not None, f"scripted {name}: no gradient for {n}"
        torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {n}: {m}")


@pytest.mark.parametrize("name", ["raftmlp_s"] + _slow("stripmlp_light_t", "affnet_et"))
def test_scripted_model_saves_and_loads(name):
    model, scripted = _scripted_pair(name)
    model.eval()
    buf = io.BytesIO()
    torch.jit.save(scripted.eval(), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(1, 3, 48, 40)  # not the built size: the resampling paths run too
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))

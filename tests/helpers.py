"""Helpers shared by the test modules (import as ``from helpers import perturb``; tests/ is on sys.path)."""
import torch
import torch.nn as nn

__all__ = ["perturb"]


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Move every floating-point tensor of the state dict (parameters and buffers) away from its init, so a wrong key
    mapping, a dropped tensor or a mis-shaped reshape shows in the outputs; returns the model in eval mode.

    Norm weights and layer / res scales are init to constants (ones, 1e-5 ...) that hide a swapped mapping: every
    tensor gets ``scale * N(0, 1)`` added; BatchNorm running variances get ``U(0.5, 1.5)`` (they must stay positive).
    Deterministic for a given ``seed`` and state-dict order.
    """
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        if name.endswith("running_var"):
            t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
        else:
            t.add_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model.eval()

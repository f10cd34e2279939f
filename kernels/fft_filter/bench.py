"""GPU benchmark cases of ``fft_filter`` at AFFNet stage shapes (for tools/benchmark_kernels.py).

``benchmark_cases(device, dtype, batch, smoke)`` returns dicts with ``name``, ``reference`` / ``triton`` (no-argument
callables returning the op output, which requires grad, so the harness can time forward and forward+backward),
``bytes`` (minimum forward HBM traffic: read x, write y), ``bytes_fwd_bwd`` (plus backward: read x and dy, write dx;
weights are negligible) and ``inputs`` (leaves whose grads the harness resets).
"""
from typing import Dict, List

import torch

# (variant -> (channels, map size at 256 input) for the three AFF stages)
STAGES = {
    "affnet": ((128, 32), (256, 16), (320, 8)),
    "affnet_t": ((96, 32), (160, 16), (192, 8)),
    "affnet_et": ((64, 32), (104, 16), (144, 8)),
}


def _case(name: str, B: int, C: int, H: int, W: int, dtype, device) -> Dict:
    from . import fft_filter
    G = 8
    bs = C // G
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    ws = [(0.02 * torch.randn(*s, generator=g)).to(device).requires_grad_(True)
          for s in ((2, G, bs, bs), (2, G, bs), (2, G, bs, bs), (2, G, bs))]

    def run(backend):
        return lambda: fft_filter(x, *ws, num_groups=G, backend=backend)

    act = x.numel() * x.element_size()
    return dict(name=name, reference=run("reference"), triton=run("triton"), bytes=2 * act, bytes_fwd_bwd=5 * act,
                inputs=[x] + ws)


def benchmark_cases(device: str = "cuda", dtype=torch.bfloat16, batch: int = 64, smoke: bool = False) -> List[Dict]:
    """AFFNet stage shapes at 256 input (maps 32/16/8), 224-input odd maps, and a detection map (spectral path)."""
    if smoke:  # tiny shapes for the CPU interpreter run of the harness
        return [_case("fft_filter/smoke/C16x7x7/B1", 1, 16, 7, 7, dtype, device),
                _case("fft_filter/smoke/C16x5x9/B1", 1, 16, 5, 9, dtype, device)]
    tag = str(dtype).replace("torch.", "")
    cases = []
    for variant, stages in STAGES.items():
        for C, S in stages:
            cases.append(_case(f"fft_filter/{variant}/C{C}x{S}x{S}/B{batch}/{tag}", batch, C, S, S, dtype, device))
    cases.append(_case(f"fft_filter/affnet/C320x7x7/B{batch}/{tag}", batch, 320, 7, 7, dtype, device))
    cases.append(_case(f"fft_filter/affnet/C256x14x14/B{batch}/{tag}", batch, 256, 14, 14, dtype, device))
    # 800x1216 detection input, stride 16 -> 50x76 map: the cuFFT + Triton spectral path
    cases.append(_case(f"fft_filter/affnet/C256x50x76/B2/{tag}", 2, 256, 50, 76, dtype, device))
    return cases

"""GPU benchmark cases of ``fft_filter`` at AFFNet stage shapes (for tools/benchmark_kernels.py).

``benchmark_cases()`` returns ``(name, reference_fn, triton_fn, bytes_moved)`` tuples; each fn is a no-argument
callable running forward + backward of the filter on preallocated tensors. ``bytes_moved`` is the minimum HBM
traffic of the fused op: forward reads x and writes y, backward reads x and dy and writes dx (weights are
negligible), i.e. 5 activation tensors in the input dtype. Run ``python -m metaformer_zoo.kernels.fft_filter.bench``
for a quick stand-alone table (CUDA required).
"""
from typing import Callable, List, Tuple

import torch

# (variant, stage, channels, map size at 256 input); batch 64 for timing
STAGES = {
    "affnet": ((128, 32), (256, 16), (320, 8)),
    "affnet_t": ((96, 32), (160, 16), (192, 8)),
    "affnet_et": ((64, 32), (104, 16), (144, 8)),
}


def _case(name: str, B: int, C: int, H: int, W: int, dtype, device) -> Tuple[str, Callable, Callable, int]:
    from . import fft_filter
    G = 8
    bs = C // G
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    ws = [(0.02 * torch.randn(*s, generator=g)).to(device).requires_grad_(True)
          for s in ((2, G, bs, bs), (2, G, bs), (2, G, bs, bs), (2, G, bs))]
    dy = torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype)

    def run(backend):
        def fn():
            y = fft_filter(x, *ws, num_groups=G, backend=backend)
            torch.autograd.grad(y, [x] + ws, dy)
        return fn

    nbytes = 5 * x.numel() * x.element_size()
    return name, run("reference"), run("triton"), nbytes


def benchmark_cases(batch: int = 64, dtype=torch.float32, device: str = "cuda") -> List[Tuple[str, Callable, Callable, int]]:
    """AFFNet stage shapes at 256x256 (maps 32/16/8) plus one detection-scale map (spectral path)."""
    cases = []
    for variant, stages in STAGES.items():
        for C, S in stages:
            cases.append(_case(f"fft_filter/{variant}/C{C}x{S}x{S}/B{batch}", batch, C, S, S, dtype, device))
    # 224 input (odd maps 7x7, 14x14) and a detection map (800x1216 input, stride 16: 50x76 -> spectral path)
    cases.append(_case(f"fft_filter/affnet/C320x7x7/B{batch}", batch, 320, 7, 7, dtype, device))
    cases.append(_case(f"fft_filter/affnet/C256x14x14/B{batch}", batch, 256, 14, 14, dtype, device))
    cases.append(_case("fft_filter/affnet/C256x50x76/B2", 2, 256, 50, 76, dtype, device))
    cases.append(_case(f"fft_filter/affnet/C256x16x16/B{batch}/bf16", batch, 256, 16, 16, torch.bfloat16, device))
    return cases


def _main():  # pragma: no cover - needs a GPU
    import triton.testing
    print(f"{'case':48s} {'ref ms':>9s} {'triton ms':>10s} {'speedup':>8s} {'GB/s':>8s}")
    for name, ref, tri, nbytes in benchmark_cases():
        t_ref = triton.testing.do_bench(ref)
        t_tri = triton.testing.do_bench(tri)
        print(f"{name:48s} {t_ref:9.3f} {t_tri:10.3f} {t_ref / t_tri:8.2f} {nbytes / t_tri / 1e6:8.1f}")


if __name__ == "__main__":  # pragma: no cover
    _main()

"""Test-session setup.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU, but only if the variable is set before
``triton`` is first imported: ``triton.language``'s own helpers (``tl.zeros``, ``tl.sum`` ...) are compiled for one
mode at import, and ``import timm`` already imports triton. So on a machine without CUDA the whole session starts in
interpreter mode, set here before any test module is imported.

The kernel tests (``test_kernel_*.py``) need the variable while they run; every other test must see the normal
dispatch (``backend="auto"`` -> the PyTorch reference on CPU tensors, not the slow interpreter), so the variable is
removed for the duration of each test outside the kernel modules.
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _kernel_dispatch_env(request, monkeypatch):
    if request.node.path.name.startswith("test_kernel_"):
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield


@pytest.fixture
def reference_kernels(monkeypatch):
    """Model tests run the CPU reference path of strip_mix even if a kernel test of the same session left
    TRITON_INTERPRET=1 set (the kernels themselves are tested in tests/test_kernel_strip_mix.py); a module opts in
    with ``pytestmark = pytest.mark.usefixtures("reference_kernels")``."""
    monkeypatch.setenv("METAFORMER_ZOO_KERNELS", "reference")

"""Test-session setup.

Kernel test modules (``test_kernel_*.py``) set ``TRITON_INTERPRET=1`` when they are imported, so their Triton kernels
compile for the CPU interpreter. That variable would otherwise stay set for the rest of the session and route every
``backend="auto"`` call of the model tests through the (slow) interpreter: outside the kernel modules it is removed for
the duration of each test, so models see the normal dispatch (the PyTorch reference on CPU tensors).
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _kernel_dispatch_env(request, monkeypatch):
    if request.node.path.name.startswith("test_kernel_"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield

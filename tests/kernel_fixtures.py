"""Where the Triton kernel tests run: shared by the kernel test files (imported, not a conftest:
the interpreter runs pass --noconftest)."""

from __future__ import annotations

import os

import pytest
import torch

from unmask.kernels._triton import HAS_TRITON

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton kernels can run: the GPU, or the CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available() and HAS_TRITON:
        return "cuda"
    if INTERPRETING and HAS_TRITON:
        return "cpu"
    pytest.skip("needs a CUDA device with Triton (or TRITON_INTERPRET=1)")

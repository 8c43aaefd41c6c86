"""Triton, when it is installed, and the small helpers every kernel's dispatcher shares.

CPU-only installs (CI, laptops) have no Triton. The kernel files still define
their `@triton.jit` functions at module level, so without Triton this module
hands them a stand-in whose `jit` returns the function untouched: the kernels
are then never launched, and the plain-PyTorch references run instead.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the references need nothing from Triton
    triton = SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b), next_power_of_2=None)
    tl = SimpleNamespace(constexpr=int)
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "use_triton", "needs_autograd", "num_sms", "next_power_of_2"]

# Under TRITON_INTERPRET=1 Triton runs kernels on the CPU with numpy; the kernel
# tests use it to check the kernels' logic on a machine without a GPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on `tensor` (CUDA, or anywhere under the interpreter)."""
    return HAS_TRITON and (tensor.is_cuda or INTERPRETING)


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a result must carry gradients (training): the kernels have no backward, the references do."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; the H100's 132 where there is no GPU (interpreter)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())

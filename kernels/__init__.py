"""Triton kernels of the forward step, each with a plain-PyTorch reference beside it.

The public functions dispatch: the Triton kernel on CUDA tensors, the
reference everywhere else (CPU serving, CI). See each module for the layout.
"""

from kernels.confidence import fused_confidence
from kernels.kv_write import write_kv
from kernels.paged_attention import paged_attention

__all__ = ["fused_confidence", "paged_attention", "write_kv"]

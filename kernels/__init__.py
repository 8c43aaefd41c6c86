"""Triton kernels of the forward step, each with a plain-PyTorch reference beside it.

The public functions dispatch: the Triton kernel on CUDA tensors, the
reference everywhere else (CPU serving, CI). See each module for the layout.
"""

from kernels.confidence import fused_confidence
from kernels.kv_write import write_kv
from kernels.paged_attention import paged_attention
from kernels.rms_norm import add_rms_norm, rms_norm
from kernels.rotary import rotary, rotary_table
from kernels.silu_mul import silu_mul

__all__ = ["add_rms_norm", "fused_confidence", "paged_attention", "rms_norm", "rotary", "rotary_table", "silu_mul", "write_kv"]

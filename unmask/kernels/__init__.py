"""Triton kernels of the forward step, each with a plain-PyTorch reference beside it.

The public functions dispatch: the Triton kernel on CUDA tensors, the
reference everywhere else (CPU serving, CI). See each module for the layout.
"""

from unmask.kernels.confidence import fused_confidence
from unmask.kernels.kv_write import write_kv
from unmask.kernels.paged_attention import paged_attention
from unmask.kernels.rms_norm import add_rms_norm, rms_norm
from unmask.kernels.rotary import rotary, rotary_table
from unmask.kernels.silu_mul import silu_mul

__all__ = ["add_rms_norm", "fused_confidence", "paged_attention", "rms_norm", "rotary", "rotary_table", "silu_mul", "write_kv"]

"""SwiGLU's activation: silu(gate) * up in one pass.

PyTorch runs it as two kernels with a bf16 intermediate; fused, the
[tokens, intermediate] tensors are read once. Rounding follows the reference:
silu(gate) is rounded to the input dtype before the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmask.kernels._triton import needs_autograd, tl, triton, use_triton

__all__ = ["silu_mul", "silu_mul_reference", "silu_mul_triton"]

_BLOCK = 1024


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch `silu_mul` (same promise)."""
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, stride_gate, stride_up, stride_out, BLOCK: tl.constexpr):
    # Grid: (rows, column blocks); rows may be strided (halves of a fused gate/up output).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton `silu_mul` (same promise) of two 2-D tensors whose rows are contiguous."""
    rows, n = gate.shape
    out = torch.empty((rows, n), dtype=gate.dtype, device=gate.device)
    if gate.numel():
        _silu_mul_kernel[(rows, triton.cdiv(n, _BLOCK))](
            gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4
        )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise, in gate's dtype.

    Runs the Triton kernel on CUDA (2-D tensors of one shape and dtype whose
    rows are contiguous, e.g. the halves of a fused gate/up output; no autograd)
    and the PyTorch reference elsewhere.
    """
    fits = (
        use_triton(gate)
        and gate.dim() == 2
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.stride(-1) == 1
        and up.stride(-1) == 1
        and not needs_autograd(gate, up)
    )
    return silu_mul_triton(gate, up) if fits else silu_mul_reference(gate, up)

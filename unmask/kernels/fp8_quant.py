"""Row-wise FP8 (e4m3) quantization: each row of a 2-D tensor gets its own float32 scale.

A row's scale is its largest magnitude over 448 (e4m3's largest finite value),
so the row is stretched over e4m3's whole range: q = x / scale, rounded to
nearest, and x ~= q * scale with a relative error of at most 2^-4 per element
(e4m3 keeps 3 mantissa bits). The largest magnitude is clamped to `MIN_ABSMAX`
first, so an all-zero row (padding) gets a tiny scale and zeros, never a
division by zero.

The same function quantizes a weight once at load (rows = output channels) and
the activations of every step (rows = tokens, dynamic scales). The Triton
kernel reads a row once and writes its e4m3 values and scale in one launch; in
plain PyTorch that is six kernels per linear layer, which at batch 1 cost more
than the GEMM they feed.
"""

from __future__ import annotations

import torch

from unmask.kernels._triton import needs_autograd, next_power_of_2, tl, triton, use_triton

__all__ = ["FP8_DTYPE", "FP8_MAX", "MIN_ABSMAX", "quantize_rows", "quantize_rows_reference", "quantize_rows_triton"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_ABSMAX = 1e-12  # a row's largest magnitude is clamped to this: all-zero rows get a finite scale


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch row-wise quantization of a 2-D x: (q [R, C] e4m3, scale [R, 1] float32), x ~= q * scale."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABSMAX) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n, stride_x, stride_q, MIN_ABS, QMAX, BLOCK: tl.constexpr):
    # One program per row, the whole row in registers (rows are at most a model's FFN width).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), MIN_ABS) / QMAX
    q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton row-wise quantization (same promise) of a 2-D x whose rows are contiguous."""
    rows, n = x.shape
    q = torch.empty((rows, n), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = next_power_of_2(n)
        _quantize_rows_kernel[(rows,)](
            x, q, scale, n, x.stride(0), q.stride(0), MIN_ABSMAX, FP8_MAX,
            BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q e4m3 [R, C], scale float32 [R, 1]) of a 2-D x, one scale per row: x ~= q * scale.

    Runs the Triton kernel on CUDA (rows with contiguous elements; no autograd)
    and the PyTorch reference elsewhere.
    """
    fits = use_triton(x) and x.dim() == 2 and x.stride(-1) == 1 and not needs_autograd(x)
    return quantize_rows_triton(x) if fits else quantize_rows_reference(x)

"""RMSNorm over the last dimension, optionally fused with the residual add before it.

Unfused, a bf16 RMSNorm is seven kernels (cast, square, mean, add, rsqrt,
scale, weight) and the residual add an eighth; with RoPE's and SwiGLU's
elementwise kernels they took 2.9 of a batch-1 dual-cache step's 8.1 ms of GPU
time at LLaDA-8B shapes on an H200. The kernel runs one program per row and
keeps the reference's rounding: the sum is rounded to the input dtype before it
is normalised, the normalised row is rounded before it meets the weight.
"""

from __future__ import annotations

import torch

from unmask.kernels._triton import needs_autograd, next_power_of_2, tl, triton, use_triton

__all__ = ["add_rms_norm", "rms_norm", "rms_norm_reference", "rms_norm_triton"]


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch norm: (normed, summed), where summed = x + residual (x itself without a residual)."""
    summed = x if residual is None else x + residual
    # Normalise in fp32: bf16 sums of squares lose the small components.
    xf = summed.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(summed.dtype) * weight, summed


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_res, stride_out, stride_sum,
    n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    normed = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton norm (same promise) of a 2-D x whose rows are contiguous."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    if x.shape[0] == 0:
        return out, summed
    res = x if residual is None else residual
    block = next_power_of_2(n)
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, summed,
        x.stride(0), res.stride(0), out.stride(0), summed.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out, summed


def _fits_kernel(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    tensors = (x, weight) if residual is None else (x, weight, residual)
    return (
        use_triton(x)
        and x.dim() == 2
        and all(t.dtype == x.dtype and t.stride(-1) == 1 for t in tensors)
        and (residual is None or residual.shape == x.shape)
        and not needs_autograd(*tensors)
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension, computed in fp32, in x's dtype.

    Runs the Triton kernel on CUDA (2-D x, weight of x's dtype, no autograd) and
    the PyTorch reference elsewhere.
    """
    if _fits_kernel(x, weight, None):
        return rms_norm_triton(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: a block's residual add and the next norm."""
    if _fits_kernel(x, weight, residual):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)

"""A linear layer's product with FP8 (e4m3) weights and FP8 activations, row-wise scaled.

The weight [N, K] is stored in e4m3 with one float32 scale per output channel
(`quantize_rows` at load, `weight_scale` [1, N]); each call quantizes the
input [T, K] per token (dynamic scales, `quantize_rows`) and multiplies in FP8
on the tensor cores with `torch._scaled_mm`, which applies both scales and the
bias in its epilogue: out[t, n] = scale_x[t] * scale_w[n] * sum_k qx[t, k] qw[n, k] + bias[n].

`torch._scaled_mm` needs compute capability 8.9 (Ada) or 9.0 (Hopper), K and
N multiples of 16 (any T), the first operand row-major and the second
column-major (the weight's transpose, a free view), scale_a [T, 1] and
scale_b [1, N] contiguous float32, and a bf16 bias for bf16 output. Its
row-wise CUTLASS kernel (Ada, or cuBLAS before 12.9) writes bf16 only, so
the product is always bf16 and cast to an fp16 model's dtype after.
"""

from __future__ import annotations

import torch

from unmask.kernels.fp8_quant import quantize_rows, quantize_rows_reference

__all__ = ["FAST_ACCUMULATION", "fp8_linear", "fp8_linear_reference", "fp8_linear_scaled_mm"]

# Hopper's FP8 tensor cores accumulate in a narrower format unless told to promote
# often; fast accumulation skips the promotion, as FP8 inference kernels commonly do.
FAST_ACCUMULATION = True


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The same arithmetic in float32 on any device: x quantized per token, both operands dequantized, multiplied.

    x [..., K] (any float dtype), weight [N, K] e4m3, weight_scale [1, N] float32,
    bias [N] or None -> [..., N] in x's dtype.
    """
    q, scale = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
    out = (q.float() * scale) @ (weight.float() * weight_scale.reshape(-1, 1)).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The FP8 product on the GPU (`torch._scaled_mm`, same promise); bias must be bf16."""
    q, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(
        q, weight.t(), scale_a=scale, scale_b=weight_scale, bias=bias,
        out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUMULATION,
    )
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ dequantized(weight).T + bias with x quantized per token: `torch._scaled_mm` on CUDA, the reference elsewhere."""
    if x.is_cuda:
        return fp8_linear_scaled_mm(x, weight, weight_scale, bias)
    return fp8_linear_reference(x, weight, weight_scale, bias)

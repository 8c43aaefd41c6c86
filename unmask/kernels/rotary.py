"""Rotary position embedding of packed tokens, half-split ("rotate_half") layout as in Llama/LLaDA/Qwen2.

The angles come from a table of cos and sin per position, computed once when
the model is built (as the reference computes them: position * inverse
frequency in fp32), so the kernel only gathers a row and rotates: one launch
per tensor instead of about a dozen elementwise kernels (angles, cos, sin, casts,
products, the concatenation).
"""

from __future__ import annotations

import torch

from unmask.kernels._triton import needs_autograd, next_power_of_2, tl, triton, use_triton

__all__ = ["rotary", "rotary_reference", "rotary_table", "rotary_triton"]


def rotary_table(inv_freq: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each fp32 [max_position, head_dim / 2], of angle = position * inv_freq."""
    angles = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def rotary_reference(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch `rotary` (same promise)."""
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_table,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: every head of it, both halves.
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    d_mask = d < HALF
    mask = (h < HEADS)[:, None] & d_mask[None, :]
    c = tl.load(cos_ptr + pos * stride_table + d, mask=d_mask, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_table + d, mask=d_mask, other=0.0)[None, :]
    src = x_ptr + token * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def rotary_triton(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton `rotary` (same promise); x may be a strided view whose last dimension is contiguous."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    heads, half = x.shape[1], x.shape[2] // 2
    _rotary_kernel[(x.shape[0],)](
        x, out, positions, cos, sin,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        HEADS=heads, HALF=half, BLOCK_H=next_power_of_2(heads), BLOCK_D=next_power_of_2(half),
        num_warps=4,
    )
    return out


def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by the angles of `positions` [T] (rows of the `rotary_table` cos/sin), in x's dtype.

    Computed in fp32. Runs the Triton kernel on CUDA (no autograd) and the
    PyTorch reference elsewhere.
    """
    fits = (
        use_triton(x)
        and x.dim() == 3
        and x.stride(-1) == 1
        and cos.stride(-1) == 1
        and sin.stride() == cos.stride()
        and not needs_autograd(x)
    )
    return rotary_triton(x, positions, cos, sin) if fits else rotary_reference(x, positions, cos, sin)

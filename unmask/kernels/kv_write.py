"""Writing the fresh K/V of a step's active tokens into the paged KV pool.

Layout: `k_cache`, `v_cache` are [num_pages, page_size, num_kv_heads, head_dim];
the flat slot of a position is page * page_size + offset, so the cache viewed as
[num_pages * page_size, num_kv_heads, head_dim] is indexed by `slot_mapping`.
"""

from __future__ import annotations

import torch

from unmask.kernels._triton import next_power_of_2, tl, triton, use_triton

__all__ = ["write_kv", "write_kv_reference", "write_kv_triton"]


def _check(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [T, kv_heads, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not hold tokens of shape {tuple(k.shape[1:])}")
    if slots.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T] = [{k.shape[0]}], got {tuple(slots.shape)}")


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Plain-PyTorch `write_kv` (same promise)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot_k, stride_cache_slot_v,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per token: copy its KV_HEADS x HEAD_DIM row of K and of V.
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding token (e.g. of a CUDA-graph batch bucket): nothing to write
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < KV_HEADS * HEAD_DIM
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + dim, mask=mask)
    # The cache rows of one slot are contiguous (checked by the caller): offs is the offset.
    tl.store(k_cache_ptr + slot * stride_cache_slot_k + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_cache_slot_v + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton `write_kv` (same promise); k and v may be strided views (e.g. of a fused QKV output)."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    for cache in (k_cache, v_cache):
        if cache.stride(3) != 1 or cache.stride(2) != cache.shape[3] or cache.stride(0) != cache.stride(1) * cache.shape[1]:
            raise ValueError("the KV caches must be contiguous within a page and pages of whole slots")
    kv_heads, head_dim = k.shape[1], k.shape[2]
    block = next_power_of_2(kv_heads * head_dim)
    _write_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), v_cache.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK=block,
        num_warps=4 if block <= 2048 else 8,
    )


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each active token's K/V into its cache slot, in place.

    k, v: [T, num_kv_heads, head_dim] (cast to the cache dtype).
    k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim].
    slot_mapping: int64 [T], page * page_size + offset of each token; a negative
    slot means "no token" (padding) and is skipped. Slots must be distinct.
    Runs the Triton kernel on CUDA and the PyTorch reference elsewhere.
    """
    if use_triton(k_cache):
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)

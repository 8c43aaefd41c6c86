"""Bidirectional attention of packed ragged queries over each sequence's KV pages.

`paged_attention` states the contract (arguments, layout, the block-causal
option) and picks an implementation; `paged_attention_reference` (PyTorch:
CPUs and tests) and `paged_attention_triton` both keep it.

The Triton kernel is a flash-attention forward over gathered pages:

- a program owns one query tile of one sequence (tiles never straddle two
  sequences) and one KV head; the tile's rows are (token, query head) pairs of
  the KV head's whole GQA group, so every K/V tile loaded serves all of them;
- the tile -> sequence map is found in the kernel from cu_seqlens_q (a prefix
  sum of the per-sequence tile counts), so launching needs no host copy of
  the device index tensors and is safe inside a CUDA graph;
- with few query tiles (decode-like steps at small batch) the key range is
  split over several programs (split-K) and a second small kernel merges the
  partial results by their log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmask.kernels._triton import next_power_of_2, num_sms, tl, triton, use_triton

__all__ = ["paged_attention", "paged_attention_reference", "paged_attention_triton"]

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 16


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    query_positions: torch.Tensor | None,
    block_causal_size: int | None,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [T, H, D] and caches [pages, page_size, KVH, D], got {tuple(q.shape)}, {tuple(k_cache.shape)}")
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if q.shape[2] != k_cache.shape[3] or heads % kv_heads:
        raise ValueError(f"{heads} query heads of dim {q.shape[2]} cannot share {kv_heads} KV heads of dim {k_cache.shape[3]}")
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or page_table.dim() != 2 or page_table.shape[0] != num_seqs:
        raise ValueError("cu_seqlens_q must be [S+1] and page_table [S, max_pages] for seq_lens [S]")
    if block_causal_size is not None:
        if block_causal_size < 1:
            raise ValueError(f"block_causal_size must be positive, got {block_causal_size}")
        if query_positions is None or query_positions.shape != (q.shape[0],):
            raise ValueError("block-causal attention needs query_positions [T]")


# ----------------------------------------------------------------------------- reference


def _gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Positions 0..length-1 of one sequence, [length, KVH, D], from its page list."""
    page_size = cache.shape[1]
    used = pages[: -(-length // page_size)].long()
    return cache[used].reshape(-1, *cache.shape[2:])[:length]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    scale: float,
    query_positions: torch.Tensor | None = None,
    block_causal_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch `paged_attention` (same promise): per sequence, gather its K/V and call SDPA in fp32."""
    _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, query_positions, block_causal_size)
    if out is None:
        out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[2]
    bounds = cu_seqlens_q.tolist()  # host copies are fine here: this path is for CPUs and tests
    for s, length in enumerate(seq_lens.tolist()):
        lo, hi = bounds[s], bounds[s + 1]
        if hi == lo:
            continue
        k = _gather_pages(k_cache, page_table[s], length).float().repeat_interleave(group, dim=1)
        v = _gather_pages(v_cache, page_table[s], length).float().repeat_interleave(group, dim=1)
        mask = None
        if block_causal_size is not None:
            visible = (query_positions[lo:hi].long() // block_causal_size + 1) * block_causal_size
            mask = torch.arange(length, device=q.device)[None, :] < visible[:, None]
        o = F.scaled_dot_product_attention(
            q[lo:hi].float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[lo:hi] = o.transpose(0, 1).to(out.dtype)
    return out


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    cu_q_ptr, seq_lens_ptr, page_table_ptr, qpos_ptr,
    num_seqs, scale_log2,
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    stride_pt,
    GROUP: tl.constexpr, TILE_TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # Which sequence owns this tile: prefix sum of per-sequence tile counts.
    s_idx = tl.arange(0, BLOCK_S)
    s_mask = s_idx < num_seqs
    q_starts = tl.load(cu_q_ptr + s_idx, mask=s_mask, other=0)
    q_ends = tl.load(cu_q_ptr + s_idx + 1, mask=s_mask, other=0)
    tiles = (q_ends - q_starts + TILE_TOKENS - 1) // TILE_TOKENS
    tiles_incl = tl.cumsum(tiles, 0)
    if tile >= tl.sum(tiles, 0):  # the grid is an upper bound on the tile count
        return
    seq = tl.sum((tiles_incl <= tile).to(tl.int32), 0)
    own = s_idx == seq
    first_tile = tl.sum(tl.where(own, tiles_incl - tiles, 0), 0)
    q_start = tl.sum(tl.where(own, q_starts, 0), 0)
    q_end = tl.sum(tl.where(own, q_ends, 0), 0)
    seq_len = tl.load(seq_lens_ptr + seq)

    # Rows are (token, head-in-group) pairs: row r is token r // GROUP of the tile.
    rows = tl.arange(0, BLOCK_M)
    tokens = q_start + (tile - first_tile) * TILE_TOKENS + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TILE_TOKENS * GROUP) & (tokens < q_end)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )

    # Keys each row may see; the tile loops up to the largest of them.
    if BLOCK_CAUSAL > 0:
        qpos = tl.load(qpos_ptr + tokens, mask=row_ok, other=0).to(tl.int32)
        row_limit = tl.minimum((qpos // BLOCK_CAUSAL + 1) * BLOCK_CAUSAL, seq_len)
        kv_end = tl.max(tl.where(row_ok, row_limit, 0), 0)
    else:
        row_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seq_len
        kv_end = seq_len
    # This split's share of the keys, in whole BLOCK_N blocks.
    chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(kv_lo + chunk, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + cols
        pos_ok = pos < kv_hi
        page = tl.load(page_table_ptr + seq * stride_pt + pos // PAGE_SIZE, mask=pos_ok, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        kv_mask = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            k_cache_ptr + page[:, None] * stride_kp + slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
            mask=kv_mask, other=0.0,
        )
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        visible = pos_ok[None, :] & (pos[None, :] < row_limit[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no visible key yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + page[:, None] * stride_vp + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
            mask=kv_mask, other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + split * stride_os + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + split * stride_ls + tokens * stride_lt + heads, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr,
    num_splits,
    stride_ps, stride_pt, stride_ph,
    stride_ls, stride_lt,
    stride_ot, stride_oh,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    # One program per (token, head): weight each split's normalised output by its share of the softmax mass.
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < num_splits
    lse = tl.load(lse_ptr + splits * stride_ls + token * stride_lt + head, mask=split_ok, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    dims = tl.arange(0, BLOCK_D)
    parts = tl.load(
        part_ptr + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph + dims[None, :],
        mask=split_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0,
    )
    total = tl.sum(weights, 0)
    o = tl.sum(parts * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


# Steps with at most this many queries per sequence on average are decode-like (keys >> queries):
# those are worth splitting over the keys; prefill-like tiles already give the GPU enough programs.
_DECODE_QUERIES = 64


def _tile_shape(num_tokens: int, num_seqs: int, group: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M rows, num_warps) for the average queries per sequence of this step."""
    avg_rows = -(-num_tokens // max(num_seqs, 1)) * group
    block_m = min(128 if head_dim <= 128 else 64, max(16, next_power_of_2(avg_rows), next_power_of_2(group)))
    num_warps = 8 if block_m * next_power_of_2(head_dim) >= 128 * 128 else 4
    return block_m, num_warps


def _choose_splits(num_tokens: int, num_seqs: int, tiles: int, kv_heads: int, device: torch.device) -> int:
    """Split the keys of decode-like steps until the grid gives every SM about two programs."""
    if num_tokens > _DECODE_QUERIES * num_seqs:
        return 1
    programs = tiles * kv_heads
    target = 2 * num_sms(device)
    if programs >= target:
        return 1
    return max(1, min(_MAX_SPLITS, target // programs))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    scale: float,
    query_positions: torch.Tensor | None = None,
    block_causal_size: int | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton `paged_attention` (same promise); the keyword options override the launch heuristics (tests, tuning)."""
    _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, query_positions, block_causal_size)
    if out is None:
        out = torch.empty_like(q)
    num_tokens, heads, head_dim = q.shape
    num_seqs, kv_heads, page_size = seq_lens.shape[0], k_cache.shape[2], k_cache.shape[1]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the head dimension of the caches and of out must be contiguous")
    group = heads // kv_heads
    default_m, default_warps = _tile_shape(num_tokens, num_seqs, group, head_dim)
    block_m = block_m or default_m
    num_warps = num_warps or default_warps
    tile_tokens = block_m // group
    # Every sequence wastes at most one partial tile, so this many tiles always suffice.
    max_tiles = num_tokens // tile_tokens + num_seqs
    expected_tiles = max(-(-num_tokens // tile_tokens), num_seqs)
    splits = num_splits or _choose_splits(num_tokens, num_seqs, expected_tiles, kv_heads, q.device)
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16
    # 128 keys a step measured fastest at head_dim 128 on an H200 (decode and prefill shapes alike).
    # fp32 caches halve it: two stages of 128-key fp32 K/V tiles overflow shared memory (~288 KiB > 227 KiB).
    keys_per_step = 128 if block_d <= 128 else 64
    block_n = block_n or (keys_per_step if k_cache.element_size() <= 2 else keys_per_step // 2)
    qpos = query_positions if block_causal_size is not None else cu_seqlens_q  # unused when not block-causal

    if splits == 1:
        partial, lse = out, out  # lse is not written without SPLIT
        strides_o = (0, out.stride(0), out.stride(1))
        strides_l = (0, 0)
    else:
        partial = torch.empty((splits, num_tokens, heads, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, num_tokens, heads), dtype=torch.float32, device=q.device)
        strides_o = partial.stride()[:3]
        strides_l = lse.stride()[:2]
    _attn_fwd_kernel[(max_tiles, kv_heads, splits)](
        q, k_cache, v_cache, partial, lse,
        cu_seqlens_q, seq_lens, page_table, qpos,
        num_seqs, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *strides_o, *strides_l,
        page_table.stride(0),
        GROUP=group, TILE_TOKENS=tile_tokens,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=max(16, next_power_of_2(num_seqs)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size,
        BLOCK_CAUSAL=block_causal_size or 0, SPLIT=splits > 1,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, heads)](
            partial, lse, out, splits,
            *partial.stride()[:3], *lse.stride()[:2],
            out.stride(0), out.stride(1),
            HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SPLITS=next_power_of_2(splits),
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    scale: float,
    query_positions: torch.Tensor | None = None,
    block_causal_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed ragged queries over their own sequences' paged K/V; returns out [T, H, D].

    A step packs the active positions of S sequences into one flat batch of T tokens.
    q: [T, H, D]; k_cache, v_cache: [num_pages, page_size, KVH, D] with H a
    multiple of KVH (GQA: query head h reads KV head h // (H // KVH)).
    cu_seqlens_q: int32 [S+1], the query rows of sequence s are cu[s]:cu[s+1].
    seq_lens: int32 [S], sequence s has keys at positions 0..seq_lens[s]-1.
    page_table: int32 [S, max_pages]; position p of sequence s is in page
    page_table[s, p // page_size], slot p % page_size.
    scale: multiplies q.k (usually head_dim ** -0.5).
    Bidirectional: every query sees all keys of its sequence, unless
    `block_causal_size` is given (block-diffusion models): then the query at
    position p = query_positions[t] (int [T]) sees the keys of its own block and
    all earlier ones, positions < (p // size + 1) * size.
    Accumulates in fp32; out has q's dtype (pass `out` to write into a
    preallocated [T, H, D] buffer, e.g. a CUDA-graph static one).
    The Triton path does no host synchronisation and can be captured in a
    CUDA graph; on CPU the PyTorch reference runs.
    """
    args = (q, k_cache, v_cache, cu_seqlens_q, seq_lens, page_table, scale, query_positions, block_causal_size, out)
    if use_triton(q):
        return paged_attention_triton(*args)
    return paged_attention_reference(*args)

"""The routed experts of a mixture-of-experts FFN: each token through its top-k SwiGLU experts, weighted.

`moe_experts` states the contract and picks an implementation;
`moe_experts_reference` (PyTorch, a loop over the experts that received
tokens: CPUs, training and tests) and `moe_experts_triton` both keep it.
Routing (the router's scores, top-k, normalisation) is the caller's.

The Triton path is four steps, none of which reads a size back to the host:

1. `align_to_blocks` sorts the T*K (token, expert) pairs by expert and pads
   each expert's run of rows to whole blocks of `block_m` rows, so that a block
   belongs to one expert (one launch: each program counts the routing and
   places its share of the pairs). Its sizes are bounds fixed by T, K and E;
   blocks past the used ones are marked with expert E and their GEMM programs
   return at once.
2. A grouped GEMM over (block, column-tile) programs multiplies a block's
   gathered token rows by its expert's gate and up rows in the same program
   and applies silu(gate) * up in the epilogue: h [padded rows, I].
3. A grouped GEMM multiplies h by the block's expert's down projection and
   writes each real row's output y [T*K, D] at its pair's index.
4. The combine sums each token's K outputs times their routing weights in
   float32 and casts once.

Only the weights of experts that received tokens are read, once per block
of rows (for few tokens per expert, once): at small T the kernel is bound by
those bytes, at large T by the matrix rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.kernels._triton import needs_autograd, next_power_of_2, tl, triton, use_triton
from unmask.kernels.silu_mul import silu_mul_reference

__all__ = [
    "ExpertBlocks",
    "MoeTiles",
    "align_to_blocks",
    "align_to_blocks_reference",
    "align_to_blocks_triton",
    "max_blocks",
    "moe_experts",
    "moe_experts_reference",
    "moe_experts_triton",
    "moe_tiles",
]

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_COMBINE_BLOCK = 1024
_ALIGN_CHUNK = 64  # pairs each alignment program places
_ALIGN_SCAN = 1024  # pairs each alignment program counts per step


def _check(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3 or topk_ids.dim() != 2:
        raise ValueError(
            f"expected x [T, D], gate_up [E, 2I, D], down [E, D, I], topk_ids [T, K]; got {tuple(x.shape)}, "
            f"{tuple(gate_up.shape)}, {tuple(down.shape)}, {tuple(topk_ids.shape)}"
        )
    experts, dim, inter = down.shape
    if gate_up.shape != (experts, 2 * inter, dim) or x.shape[1] != dim:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} and x {tuple(x.shape)} do not fit down {tuple(down.shape)} [E, D, I]")
    if topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [T={x.shape[0]}, K]")
    if not (x.dtype == gate_up.dtype == down.dtype):
        raise ValueError(f"x, gate_up and down must share a dtype, got {x.dtype}, {gate_up.dtype}, {down.dtype}")


# ----------------------------------------------------------------------------- reference


def moe_experts_reference(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Plain-PyTorch `moe_experts` (same promise): a loop over the experts that received tokens.

    Supports autograd. Reads the routed experts back to the host, so it cannot
    be captured in a CUDA graph: under capture it raises RuntimeError.
    """
    _check(x, gate_up, down, topk_ids, topk_weights)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "moe_experts_reference reads the routing back to the host and cannot be captured in a CUDA graph "
            "(the Triton path can: bf16/fp16/fp32 without autograd)"
        )
    top_k, inter = topk_ids.shape[1], down.shape[2]
    accumulate = torch.promote_types(x.dtype, torch.float32)  # float64 inputs (gradcheck) stay float64
    out = torch.zeros(x.shape, dtype=accumulate, device=x.device)
    expert_of_pair = topk_ids.reshape(-1)
    weight_of_pair = topk_weights.reshape(-1).to(accumulate)
    for expert in torch.unique(expert_of_pair).tolist():
        pairs = (expert_of_pair == expert).nonzero().squeeze(1)
        tokens = pairs // top_k
        gate_up_out = x.index_select(0, tokens) @ gate_up[expert].t()
        hidden = silu_mul_reference(gate_up_out[:, :inter], gate_up_out[:, inter:])
        expert_out = hidden @ down[expert].t()
        out.index_add_(0, tokens, expert_out.to(accumulate) * weight_of_pair[pairs, None])
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- alignment


@dataclass
class ExpertBlocks:
    """The T*K (token, expert) pairs sorted by expert, each expert's rows padded to whole blocks.

    Pair p = t * K + k is token t's k-th choice. Expert e's pairs, in pair
    order, fill its blocks' rows from the first; the rest of its last block is
    padding. Experts' blocks follow one another in expert order, experts
    without pairs have none.
    sorted_pairs: int32 [max_blocks * block_m], the pair each row holds; T*K marks padding.
    block_experts: int32 [max_blocks], the expert of each block; E (no expert) past the used blocks.
    """

    sorted_pairs: torch.Tensor
    block_experts: torch.Tensor
    block_m: int


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Most blocks `num_pairs` pairs can need: each expert with pairs wastes less than one block on padding."""
    return -(-num_pairs // block_m) + min(num_experts, num_pairs)


def align_to_blocks_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Plain-PyTorch `align_to_blocks` (same result): a stable sort of the pairs by expert, scattered into rows."""
    expert_of_pair = topk_ids.reshape(-1).long()
    num_pairs, device = expert_of_pair.numel(), expert_of_pair.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, expert_of_pair, torch.ones_like(expert_of_pair))
    blocks = (counts + block_m - 1) // block_m
    block_end = blocks.cumsum(0)
    first_row = (block_end - blocks) * block_m  # each expert's first padded row
    first_sorted = counts.cumsum(0) - counts  # each expert's first position among the sorted pairs
    order = torch.argsort(expert_of_pair, stable=True)
    sorted_experts = expert_of_pair[order]
    rank = torch.arange(num_pairs, device=device) - first_sorted[sorted_experts]
    rows = first_row[sorted_experts] + rank
    total_blocks = max_blocks(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((total_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, rows, order.to(torch.int32))
    # Block b belongs to the expert whose [block_end - blocks, block_end) range holds b.
    block_ids = torch.arange(total_blocks, device=device)
    block_experts = torch.searchsorted(block_end, block_ids, right=True).to(torch.int32)
    return ExpertBlocks(sorted_pairs=sorted_pairs, block_experts=block_experts, block_m=block_m)


@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, EXPERT_BINS: tl.constexpr, CHUNK: tl.constexpr, SCAN: tl.constexpr,
):
    # Program c places the pairs of chunk c. Each program counts the whole routing itself
    # (it is small and read from L2), so no program waits for another.
    chunk_start = tl.program_id(0) * CHUNK
    experts = tl.arange(0, EXPERT_BINS)
    counts = tl.zeros((EXPERT_BINS,), dtype=tl.int32)  # pairs per expert
    before = tl.zeros((EXPERT_BINS,), dtype=tl.int32)  # pairs per expert ahead of this chunk
    scan = tl.arange(0, SCAN)
    for start in range(0, num_pairs, SCAN):
        idx = start + scan
        e = tl.load(ids_ptr + idx, mask=idx < num_pairs, other=0).to(tl.int32)
        counts += tl.histogram(e, EXPERT_BINS, mask=idx < num_pairs)
        before += tl.histogram(e, EXPERT_BINS, mask=idx < chunk_start)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    first_row = (block_end - blocks) * BLOCK_M

    # A pair's row: its expert's first row, then the expert's pairs of earlier chunks, then those
    # earlier in this chunk (pair order within an expert).
    lanes = tl.arange(0, CHUNK)
    mine = chunk_start + lanes
    mine_ok = mine < num_pairs
    my_expert = tl.load(ids_ptr + mine, mask=mine_ok, other=-1).to(tl.int32)
    earlier_same = (my_expert[:, None] == my_expert[None, :]) & (lanes[None, :] < lanes[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), 1)
    start_of_mine = tl.where(my_expert[:, None] == experts[None, :], (first_row + before)[None, :], 0)
    tl.store(sorted_pairs_ptr + tl.sum(start_of_mine, 1) + rank, mine, mask=mine_ok)

    pad = tl.arange(0, BLOCK_M)
    if chunk_start == 0:  # the rest of each expert's last block is padding
        pad_rows = (first_row + counts)[:, None] + pad[None, :]
        pad_ok = pad[None, :] < (blocks * BLOCK_M - counts)[:, None]
        tl.store(sorted_pairs_ptr + pad_rows, num_pairs, mask=pad_ok)
    # Block b's expert: how many experts' blocks end at or before b; past the used blocks, none.
    for b0 in range(chunk_start, num_blocks, tl.num_programs(0) * CHUNK):
        b = b0 + lanes
        owner = tl.minimum(tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), 1), num_experts)
        tl.store(block_experts_ptr + b, owner, mask=b < num_blocks)
        unused = (owner == num_experts) & (b < num_blocks)
        tl.store(sorted_pairs_ptr + b[:, None] * BLOCK_M + pad[None, :], num_pairs, mask=unused[:, None])


def align_to_blocks_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Triton `align_to_blocks` (same result) in one launch."""
    expert_of_pair = topk_ids.reshape(-1).contiguous()
    num_pairs = expert_of_pair.numel()
    if num_pairs == 0:
        return align_to_blocks_reference(topk_ids, num_experts, block_m)
    total_blocks = max_blocks(num_pairs, num_experts, block_m)
    sorted_pairs = torch.empty(total_blocks * block_m, dtype=torch.int32, device=topk_ids.device)
    block_experts = torch.empty(total_blocks, dtype=torch.int32, device=topk_ids.device)
    bins = max(32, next_power_of_2(num_experts))  # Triton's histogram keeps at least a bin per lane of a warp
    _moe_align_kernel[(triton.cdiv(num_pairs, _ALIGN_CHUNK),)](
        expert_of_pair, sorted_pairs, block_experts, num_pairs, num_experts, total_blocks,
        BLOCK_M=block_m, EXPERT_BINS=bins, CHUNK=_ALIGN_CHUNK, SCAN=_ALIGN_SCAN, num_warps=4 if bins <= 256 else 8,
    )
    return ExpertBlocks(sorted_pairs=sorted_pairs, block_experts=block_experts, block_m=block_m)


def align_to_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sort topk_ids' pairs by expert into blocks of `block_m` rows (see `ExpertBlocks`).

    topk_ids: int [T, K], values in [0, num_experts); block_m a power of two.
    The result's sizes depend on T, K, E and block_m only, and neither
    implementation reads a value back to the host. The Triton kernel runs on
    CUDA (one launch, safe to capture in a CUDA graph), the PyTorch reference
    elsewhere.
    """
    if use_triton(topk_ids):
        return align_to_blocks_triton(topk_ids, num_experts, block_m)
    return align_to_blocks_reference(topk_ids, num_experts, block_m)


# ----------------------------------------------------------------------------- Triton GEMMs


@dataclass(frozen=True)
class MoeTiles:
    """Launch shape of the two grouped GEMMs: rows per block, columns and reduction depth per step,
    and how many blocks consecutive programs share (see `_program_tile`)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group: int = 8


def moe_tiles(num_pairs: int, num_experts: int, dtype: torch.dtype) -> MoeTiles:
    """Tiles for a step of `num_pairs` pairs over `num_experts` experts.

    A block holds one expert's rows, so its height follows the rows an expert
    gets on average: 16 (the smallest matrix tile) when tokens are few and the
    kernel streams weights, up to 64 with wider column tiles when they are
    many and the matrix units are the limit. fp32 tiles take twice the shared
    memory, so they step through the reduction in halves.
    """
    rows_per_expert = -(-num_pairs // max(num_experts, 1))
    block_m = min(64, max(16, next_power_of_2(rows_per_expert)))
    wide = dtype == torch.float32
    if block_m == 16:
        return MoeTiles(16, 64, 64 if wide else 128, num_warps=4, num_stages=3 if wide else 4)
    if block_m == 32:
        return MoeTiles(32, 64, 32 if wide else 64, num_warps=4, num_stages=3 if wide else 4)
    return MoeTiles(64, 128, 32 if wide else 64, num_warps=8, num_stages=2 if wide else 3)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs multiply in full fp32 like PyTorch's default matmul, not in tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _program_tile(num_blocks, num_col_tiles, GROUP: tl.constexpr):
    """(block, column tile) of this program. Consecutive programs sweep GROUP blocks' rows across
    every column tile before moving on, so the token rows and the expert weights of a group stay in L2."""
    pid = tl.program_id(0)
    per_group = GROUP * num_col_tiles
    first_block = (pid // per_group) * GROUP
    group_size = tl.minimum(num_blocks - first_block, GROUP)
    return first_block + pid % group_size, (pid % per_group) // group_size


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, num_experts, num_blocks,
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_hr,
    DIM: tl.constexpr, INTER: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Program (block, column tile): h[rows, cols] = silu(x[rows] @ gate[cols]^T) * (x[rows] @ up[cols]^T).
    block, col_tile = _program_tile(num_blocks, tl.cdiv(INTER, BLOCK_N), GROUP)
    expert = tl.load(block_experts_ptr + block)
    if expert >= num_experts:  # past the used blocks
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xd
    gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wd
    up_ptrs = gate_ptrs + INTER * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        k_ok = (k0 + ks) < DIM
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        gate_w = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        up_w = tl.load(up_ptrs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, gate_w, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, up_w, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        gate_ptrs += BLOCK_K * stride_wd
        up_ptrs += BLOCK_K * stride_wd
    # Rounded where the per-expert loop rounds: each GEMM's output, silu(gate), the product.
    dtype = h_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    # Padding rows are written too (as zeros): the down GEMM reads whole blocks.
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + cols[None, :]
    tl.store(h_ptrs, (act * up).to(dtype), mask=col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, y_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, num_experts, num_blocks,
    stride_hr, stride_we, stride_wn, stride_wi, stride_yp,
    DIM: tl.constexpr, INTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Program (block, column tile): y[pair of each real row, cols] = h[rows] @ down[cols]^T.
    block, col_tile = _program_tile(num_blocks, tl.cdiv(DIM, BLOCK_N), GROUP)
    expert = tl.load(block_experts_ptr + block)
    if expert >= num_experts:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_ok = pairs < num_pairs
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < DIM
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hr + ks[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k_ok = (k0 + ks) < INTER
        a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wi
    y_ptrs = y_ptr + pairs[:, None].to(tl.int64) * stride_yp + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_combine_kernel(
    y_ptr, weights_ptr, out_ptr, dim, stride_yp, stride_ot,
    TOP_K: tl.constexpr, BLOCK: tl.constexpr,
):
    # Program (token, column block): out[t] = sum_k weights[t, k] * y[t * K + k], in float32.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < dim
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        weight = tl.load(weights_ptr + token * TOP_K + k)
        y = tl.load(y_ptr + (token * TOP_K + k) * stride_yp + cols, mask=col_ok, other=0.0)
        acc += weight * y.to(tl.float32)
    tl.store(out_ptr + token * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _gate_up(x: torch.Tensor, gate_up: torch.Tensor, blocks: ExpertBlocks, top_k: int, tiles: MoeTiles) -> torch.Tensor:
    """h [max_blocks * block_m, I]: each used block's rows through its expert's gate/up and silu_mul."""
    experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty((blocks.sorted_pairs.numel(), inter), dtype=x.dtype, device=x.device)
    num_blocks = blocks.block_experts.numel()
    _moe_gate_up_kernel[(num_blocks * triton.cdiv(inter, tiles.block_n),)](
        x, gate_up, h, blocks.sorted_pairs, blocks.block_experts,
        x.shape[0] * top_k, experts, num_blocks,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), h.stride(0),
        DIM=x.shape[1], INTER=inter, TOP_K=top_k,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP=tiles.group,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return h


def _down(h: torch.Tensor, down: torch.Tensor, blocks: ExpertBlocks, num_pairs: int, tiles: MoeTiles) -> torch.Tensor:
    """y [T*K, D]: each pair's expert output, at its pair index."""
    experts, dim, inter = down.shape
    y = torch.empty((num_pairs, dim), dtype=h.dtype, device=h.device)
    num_blocks = blocks.block_experts.numel()
    _moe_down_kernel[(num_blocks * triton.cdiv(dim, tiles.block_n),)](
        h, down, y, blocks.sorted_pairs, blocks.block_experts,
        num_pairs, experts, num_blocks,
        h.stride(0), down.stride(0), down.stride(1), down.stride(2), y.stride(0),
        DIM=dim, INTER=inter,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP=tiles.group,
        DOT_PRECISION=_dot_precision(h.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return y


def _combine(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out [T, D]: each token's K expert outputs times their weights, summed in float32."""
    tokens, top_k = topk_weights.shape
    dim = y.shape[1]
    weights = topk_weights.to(torch.float32).contiguous()
    out = torch.empty((tokens, dim), dtype=y.dtype, device=y.device)
    block = min(_COMBINE_BLOCK, next_power_of_2(dim))
    _moe_combine_kernel[(tokens, triton.cdiv(dim, block))](
        y, weights, out, dim, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK=block, num_warps=4
    )
    return out


def moe_experts_triton(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    tiles: MoeTiles | None = None,
) -> torch.Tensor:
    """Triton `moe_experts` (same promise); `tiles` overrides `moe_tiles`' choice (benchmark sweeps).

    Needs x, gate_up and down in bf16, fp16 or fp32; any T, E, K, D and I
    (partial tiles are masked). No host synchronisation: it can be captured
    in a CUDA graph for a fixed T and replayed with any routing.
    """
    _check(x, gate_up, down, topk_ids, topk_weights)
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton MoE kernel takes {_TRITON_DTYPES}, got {x.dtype}")
    tokens, top_k = topk_ids.shape
    num_pairs = tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    tiles = tiles or moe_tiles(num_pairs, gate_up.shape[0], x.dtype)
    blocks = align_to_blocks(topk_ids, gate_up.shape[0], tiles.block_m)
    h = _gate_up(x, gate_up, blocks, top_k, tiles)
    y = _down(h, down, blocks, num_pairs, tiles)
    return _combine(y, topk_weights)


# ----------------------------------------------------------------------------- dispatch


def moe_experts(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """The routed experts' weighted sum for each token; returns out [T, D] in x's dtype.

    x: [T, D]; gate_up: [E, 2I, D] (expert e's gate rows gate_up[e, :I], up
    rows gate_up[e, I:]); down: [E, D, I]; topk_ids: int64 [T, K], values in
    [0, E); topk_weights: float32 [T, K], the routing weights.
    out[t] = sum_k topk_weights[t, k] * down[e] @ silu(gate[e] @ x[t]) * (up[e] @ x[t]),
    e = topk_ids[t, k]. Each expert's GEMM outputs, silu(gate) and its output
    are rounded to x's dtype, as a per-expert loop in that dtype rounds them;
    the weighted sum accumulates in float32 (float64 for float64 inputs, in the
    reference) and is cast to x's dtype at the end.
    Runs the Triton kernels on CUDA (bf16/fp16/fp32, no autograd): no host
    synchronisation, safe to capture in a CUDA graph. Elsewhere, and whenever
    gradients are needed, the PyTorch reference runs; it reads the routing
    back to the host, so under CUDA graph capture it raises RuntimeError.
    """
    fits = use_triton(x) and x.dtype in _TRITON_DTYPES and not needs_autograd(x, gate_up, down, topk_weights)
    if fits:
        return moe_experts_triton(x, gate_up, down, topk_ids, topk_weights)
    return moe_experts_reference(x, gate_up, down, topk_ids, topk_weights)

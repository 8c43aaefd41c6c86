"""Fused confidence: the proposed token of each row of logits and the model's probability for it.

For logits [N, V] (V = 126,464 for LLaDA-8B), without materialising the
softmax:

- greedy rows (no temperature, or temperature 0): token = argmax(l), and the
  confidence softmax(l)[token] = 1 / sum(exp(l - max l));
- sampled rows (temperature T > 0): Gumbel-max sampling,
  token = argmax(l / T + g) with g ~ Gumbel(0, 1), which draws token i with
  probability softmax(l / T)[i]; the confidence is still read from the
  softmax of the un-noised logits, softmax(l)[token] (LLaDA's rule).

The Triton kernel makes one pass over each row. The vocabulary is cut into
chunks so that few rows still fill the GPU; each program keeps an online
max / sum-of-exponentials and the best (noised) key of its chunk, and a tiny
second kernel merges the chunks. The Gumbel noise is `kernels.noise`, keyed by
the row's noise key (its "seed": `noise.row_keys` of a step seed and a
position) and the column's token id, so a row's sample depends only on its
logits, temperature and key: not on the batch it runs in, nor on the chunking,
nor on whether the kernel or its PyTorch reference ran it.
"""

from __future__ import annotations

import torch

from unmask.kernels._triton import HAS_TRITON, next_power_of_2, num_sms, tl, triton, use_triton
from unmask.kernels.noise import gumbel_bits, gumbel_from_bits, gumbel_keys

__all__ = ["fused_confidence", "fused_confidence_reference", "fused_confidence_triton", "precompile_fused_confidence"]

# A program scans its chunk in steps of 4 tiles of _ROWS x _WIDTH columns: one tile row per warp,
# 8 bf16 (16 bytes) per lane.
_ROWS, _WIDTH = 8, 256
_BLOCK_V = 4 * _ROWS * _WIDTH


def _check(logits: torch.Tensor, temperature: torch.Tensor | None, seeds: torch.Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    rows = logits.shape[0]
    if temperature is not None:
        if temperature.shape != (rows,):
            raise ValueError(f"temperature must be [N] = [{rows}], got {tuple(temperature.shape)}")
        if seeds is None or seeds.shape != (rows,):
            raise ValueError("sampling with a temperature needs one int64 seed per row")


# ----------------------------------------------------------------------------- reference


def fused_confidence_reference(
    logits: torch.Tensor, temperature: torch.Tensor | None = None, seeds: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch `fused_confidence` (same promise, same noise: the kernel's tokens up to fp32 rounding of the keys)."""
    _check(logits, temperature, seeds)
    x = logits.float()
    tokens = x.argmax(-1)
    if temperature is not None:
        sampled = (temperature > 0).nonzero().flatten()
        if sampled.numel():
            tokens[sampled] = gumbel_keys(x[sampled], temperature[sampled], seeds[sampled]).argmax(-1)
    log_norm = torch.logsumexp(x, -1)
    confidence = torch.exp(x.gather(1, tokens[:, None]).squeeze(1) - log_norm)
    return tokens, confidence


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _scan_tile(
    m, s, best_key, best_idx, best_logit, row_ptr, base, tile, hi, inv_temp, key,
    SAMPLED: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
):
    """Fold one [ROWS, WIDTH] tile of a row's logits into the per-warp state (one warp per tile row).

    The state holds, per tile row, the running max m, the sum s of exp(l - m), and the best key with its
    column and logit. Reductions run along axis 1, inside one warp, so the loop needs no block barrier.
    """
    cols = base + tile
    x = tl.load(row_ptr + cols, mask=cols < hi, other=float("-inf")).to(tl.float32)
    if SAMPLED:
        keys = tl.where(cols < hi, x * inv_temp + gumbel_from_bits(gumbel_bits(key, cols)), float("-inf"))
        tile_max = tl.max(x, 1)
        tile_key, tile_arg = tl.max(keys, 1, return_indices=True, return_indices_tie_break_left=True)
        tile_logit = tl.sum(tl.where(tl.arange(0, WIDTH)[None, :] == tile_arg[:, None], x, 0.0), 1)
    else:
        tile_max, tile_arg = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
        tile_key = tile_max
        tile_logit = tile_max
    m_new = tl.maximum(m, tile_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
    s = s * tl.exp2((m - m_safe) * 1.4426950408889634) + tl.sum(tl.exp2((x - m_safe[:, None]) * 1.4426950408889634), 1)
    # Tiles come in column order within a row, so strictly greater keeps the first maximum (as torch.argmax).
    better = tile_key > best_key
    best_key = tl.where(better, tile_key, best_key)
    best_idx = tl.where(better, base + tl.arange(0, ROWS) * WIDTH + tile_arg, best_idx)
    best_logit = tl.where(better, tile_logit, best_logit)
    return m_new, s, best_key, best_idx, best_logit


@triton.jit
def _scan_chunk(row_ptr, lo, hi, inv_temp, key, SAMPLED: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """(max, sum of exp(l - max), best key, its column, its logit) of columns lo..hi-1 of one row.

    Each step covers 4 tiles of ROWS x WIDTH columns; the noise of column c depends only on (key, c).
    """
    tile = tl.arange(0, ROWS)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    best_key = tl.full([ROWS], float("-inf"), tl.float32)
    best_idx = tl.zeros([ROWS], tl.int32) + lo
    best_logit = tl.full([ROWS], float("-inf"), tl.float32)
    for start in range(lo, hi, 4 * ROWS * WIDTH):
        step = ROWS * WIDTH
        m, s, best_key, best_idx, best_logit = _scan_tile(
            m, s, best_key, best_idx, best_logit, row_ptr, start, tile, hi, inv_temp, key, SAMPLED, ROWS, WIDTH)
        m, s, best_key, best_idx, best_logit = _scan_tile(
            m, s, best_key, best_idx, best_logit, row_ptr, start + step, tile, hi, inv_temp, key, SAMPLED, ROWS, WIDTH)
        m, s, best_key, best_idx, best_logit = _scan_tile(
            m, s, best_key, best_idx, best_logit, row_ptr, start + 2 * step, tile, hi, inv_temp, key, SAMPLED, ROWS, WIDTH)
        m, s, best_key, best_idx, best_logit = _scan_tile(
            m, s, best_key, best_idx, best_logit, row_ptr, start + 3 * step, tile, hi, inv_temp, key, SAMPLED, ROWS, WIDTH)
    # Merge the tile rows (warps): the leftmost column wins ties, since warps interleave columns.
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    s_all = tl.sum(s * tl.exp2((m - m_safe) * 1.4426950408889634), 0)
    key_all = tl.max(best_key, 0)
    idx_all = tl.min(tl.where(best_key == key_all, best_idx, 2147483647), 0)
    logit_all = tl.max(tl.where((best_key == key_all) & (best_idx == idx_all), best_logit, float("-inf")), 0)
    return m_all, s_all, key_all, idx_all, logit_all


@triton.jit
def _confidence_chunk_kernel(
    logits_ptr, temp_ptr, seed_ptr,
    m_ptr, s_ptr, key_ptr, idx_ptr, logit_ptr,
    tokens_ptr, conf_ptr,
    vocab, chunk, stride_row, num_chunks,
    HAS_TEMPERATURE: tl.constexpr, SINGLE_CHUNK: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.program_id(1)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, vocab)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    if HAS_TEMPERATURE:
        temp = tl.load(temp_ptr + row)
        seed = tl.load(seed_ptr + row)
        if temp > 0.0:
            m, s, key, idx, logit = _scan_chunk(row_ptr, lo, hi, 1.0 / temp, seed, True, ROWS, WIDTH)
        else:
            m, s, key, idx, logit = _scan_chunk(row_ptr, lo, hi, 1.0, seed, False, ROWS, WIDTH)
    else:
        m, s, key, idx, logit = _scan_chunk(row_ptr, lo, hi, 1.0, 0, False, ROWS, WIDTH)

    if SINGLE_CHUNK:
        tl.store(tokens_ptr + row, idx.to(tl.int64))
        tl.store(conf_ptr + row, tl.exp2((logit - m) * 1.4426950408889634) / s)
    else:
        at = row * num_chunks + c
        tl.store(m_ptr + at, m)
        tl.store(s_ptr + at, s)
        tl.store(key_ptr + at, key)
        tl.store(idx_ptr + at, idx)
        tl.store(logit_ptr + at, logit)


@triton.jit
def _confidence_merge_kernel(
    m_ptr, s_ptr, key_ptr, idx_ptr, logit_ptr, tokens_ptr, conf_ptr,
    num_chunks, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    ok = c < num_chunks
    at = row * num_chunks + c
    m = tl.load(m_ptr + at, mask=ok, other=float("-inf"))
    s = tl.load(s_ptr + at, mask=ok, other=0.0)
    keys = tl.load(key_ptr + at, mask=ok, other=float("-inf"))
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.sum(s * tl.exp2((m - m_safe) * 1.4426950408889634), 0)
    # Chunks are in column order, so the leftmost best chunk holds the first maximum.
    best = tl.argmax(keys, 0, tie_break_left=True)
    token = tl.load(idx_ptr + row * num_chunks + best)
    logit = tl.load(logit_ptr + row * num_chunks + best)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(conf_ptr + row, tl.exp2((logit - m_safe) * 1.4426950408889634) / total)


def _choose_chunks(rows: int, vocab: int, device: torch.device) -> int:
    """Enough chunks per row for about four programs per SM, each at least one block wide."""
    target = 4 * num_sms(device)
    return max(1, min(-(-target // rows), -(-vocab // _BLOCK_V)))


def fused_confidence_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `fused_confidence` (same promise). `num_chunks` overrides the vocabulary split (tests, tuning)."""
    _check(logits, temperature, seeds)
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    conf = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return tokens, conf
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunks = min(num_chunks or _choose_chunks(rows, vocab, logits.device), -(-vocab // _BLOCK_V))
    chunk = -(-(-(-vocab // chunks)) // _BLOCK_V) * _BLOCK_V  # whole blocks per chunk
    chunks = -(-vocab // chunk)
    # Per (row, chunk): max, sum of exponentials, best key, its column and its logit.
    m, s, key, logit = torch.empty(4, rows * chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows * chunks, dtype=torch.int32, device=logits.device)
    has_temp = temperature is not None
    _confidence_chunk_kernel[(rows, chunks)](
        logits,
        temperature.float() if has_temp else conf,
        seeds.long() if has_temp else tokens,
        m, s, key, idx, logit, tokens, conf,
        vocab, chunk, logits.stride(0), chunks,
        HAS_TEMPERATURE=has_temp, SINGLE_CHUNK=chunks == 1, ROWS=_ROWS, WIDTH=_WIDTH,
        num_warps=_ROWS,
    )
    if chunks > 1:
        # BLOCK_C covers every chunk count this vocabulary allows: one compiled variant, whatever the rows.
        block_c = next_power_of_2(-(-vocab // _BLOCK_V))
        _confidence_merge_kernel[(rows,)](m, s, key, idx, logit, tokens, conf, chunks, BLOCK_C=block_c, num_warps=1)
    return tokens, conf


def precompile_fused_confidence(vocab: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every variant a step can need now, rather than in the middle of serving.

    The variant follows the step's number of rows: one chunk per row (many
    rows) or a split vocabulary, whose chunk count Triton specialises as 1, a
    multiple of 16 or another number. A server meets some of them only when its
    load changes; compiling one then stalled that step (1.7 s on an H200 for
    LLaDA's vocabulary, measured in a batch-64 run). Rows 1, 4 x SMs - 1 and
    4 x SMs give the split into the most chunks (16 for LLaDA), into 2, and none.
    """
    if device.type != "cuda" or not HAS_TRITON:
        return
    many = 4 * num_sms(device)
    for rows in (1, many - 1, many):
        logits = torch.zeros(rows, vocab, dtype=dtype, device=device)
        fused_confidence_triton(logits, torch.zeros(rows, device=device), torch.zeros(rows, dtype=torch.long, device=device))


def fused_confidence(
    logits: torch.Tensor, temperature: torch.Tensor | None = None, seeds: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_ids int64 [N], confidence fp32 [N]) for logits [N, V] of any float dtype.

    temperature: fp32 [N] or None. Rows with temperature 0 (or all rows, when
    None) are greedy: token = argmax (the first, on ties). Rows with T > 0 draw
    token ~ softmax(logits / T) by Gumbel-max with the noise (`kernels.noise`)
    of each row's key in `seeds` (int64 [N], required with a temperature); the
    same logits, T and key give the same token whatever else is in the batch,
    in the kernel and in the reference alike (up to fp32 rounding of the keys). confidence = softmax(logits)[token]
    of the un-noised logits. Runs the Triton kernel on CUDA (no host
    synchronisation) and the PyTorch reference elsewhere.
    """
    if use_triton(logits):
        return fused_confidence_triton(logits, temperature, seeds)
    return fused_confidence_reference(logits, temperature, seeds)

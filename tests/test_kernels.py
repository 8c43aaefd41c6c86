"""The kernels of `kernels/`: references against naive dense computations, Triton against the references.

The reference tests run everywhere (CI). The Triton tests carry the `gpu`
marker and run on CUDA; without a GPU they can still check the kernels'
logic through Triton's CPU interpreter:

    TRITON_INTERPRET=1 pytest --noconftest -m gpu tests/test_kernels.py

Every check draws fresh random inputs: ragged sequence lengths that are not
multiples of the page size, pages handed out in shuffled order, caches whose
unused slots hold NaN (reading one poisons the output), and outputs filled
with NaN before the kernel writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kernel_fixtures import INTERPRETING, kernel_device  # noqa: F401  (pytest fixture)
from unmask.kernels.confidence import fused_confidence, fused_confidence_reference, fused_confidence_triton
from unmask.kernels.kv_write import write_kv, write_kv_reference, write_kv_triton
from unmask.kernels.paged_attention import paged_attention, paged_attention_reference, paged_attention_triton
from unmask.kernels.rms_norm import add_rms_norm, rms_norm, rms_norm_reference, rms_norm_triton
from unmask.kernels.rotary import rotary, rotary_reference, rotary_table, rotary_triton
from unmask.kernels.silu_mul import silu_mul, silu_mul_reference, silu_mul_triton

# The serving dtype; the interpreter's bf16 matrix product is broken (Triton 3.9), so it checks fp16.
HALF = torch.float16 if INTERPRETING else torch.bfloat16


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ----------------------------------------------------------------------------- a paged batch


@dataclass
class PagedBatch:
    """A packed step over S sequences, with the logical K/V it was paged from."""

    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [pages, page_size, KVH, D]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 [S+1]
    seq_lens: torch.Tensor  # int32 [S]
    page_table: torch.Tensor  # int32 [S, max_pages]
    positions: torch.Tensor  # int64 [T], query position within its sequence
    keys: list[torch.Tensor]  # per sequence [L, KVH, D]
    values: list[torch.Tensor]


def _paged_batch(
    seq_lens: list[int],
    queries: list[int | None],
    heads: int,
    kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> PagedBatch:
    """Random sequences paged into a shuffled pool; `queries[s]` active positions of sequence s (None: all)."""
    pages_needed = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_needed) + 3  # spare pages stay NaN: reading one is caught
    order = torch.randperm(num_pages)
    k_cache = torch.full((num_pages, page_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    page_table = torch.full((len(seq_lens), max(pages_needed) + 1), int(order[-1]), dtype=torch.int32)
    keys, values, positions, counts, used = [], [], [], [], 0
    for s, (n, nq) in enumerate(zip(seq_lens, queries)):
        pages = order[used : used + pages_needed[s]]
        used += pages_needed[s]
        page_table[s, : len(pages)] = pages.to(torch.int32)
        k = torch.randn(n, kv_heads, head_dim).to(dtype)
        v = torch.randn(n, kv_heads, head_dim).to(dtype)
        slots = pages[torch.arange(n) // page_size] * page_size + torch.arange(n) % page_size
        k_cache.view(-1, kv_heads, head_dim)[slots] = k
        v_cache.view(-1, kv_heads, head_dim)[slots] = v
        active = torch.arange(n) if nq is None else torch.randperm(n)[:nq].sort().values
        keys.append(k), values.append(v), positions.append(active), counts.append(len(active))
    total = sum(counts)
    return PagedBatch(
        q=torch.randn(total, heads, head_dim).to(dtype).to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        cu_seqlens_q=torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        page_table=page_table.to(device),
        positions=torch.cat(positions).to(device),
        keys=keys,
        values=values,
    )


def _dense_attention(b: PagedBatch, scale: float, block_causal_size: int | None = None) -> torch.Tensor:
    """Naive float64 softmax(q k^T * scale) v per sequence, straight from the logical K/V."""
    heads, kv_heads = b.q.shape[1], b.keys[0].shape[1]
    out = torch.empty(b.q.shape, dtype=torch.float64)
    cu = b.cu_seqlens_q.tolist()
    for s, (k, v) in enumerate(zip(b.keys, b.values)):
        q = b.q[cu[s] : cu[s + 1]].double().cpu()
        k = k.double().repeat_interleave(heads // kv_heads, dim=1)
        v = v.double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("thd,lhd->htl", q, k) * scale
        if block_causal_size is not None:
            pos = b.positions[cu[s] : cu[s + 1]].cpu()
            visible = torch.arange(k.shape[0])[None, :] < ((pos // block_causal_size + 1) * block_causal_size)[:, None]
            scores = scores.masked_fill(~visible[None], float("-inf"))
        out[cu[s] : cu[s + 1]] = torch.einsum("htl,lhd->thd", scores.softmax(-1), v)
    return out


# ----------------------------------------------------------------------------- references (CPU, CI)


def test_write_kv_reference_puts_each_token_in_its_slot():
    k_cache = torch.full((5, 4, 2, 8), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(20)[:7]
    k, v = torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    write_kv_reference(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // 4, slot % 4], k[t])
        assert torch.equal(v_cache[slot // 4, slot % 4], v[t])
    assert int(torch.isnan(k_cache).flatten(2).all(-1).sum()) == 20 - 7  # nothing else was touched


def test_write_kv_reference_skips_negative_slots():
    k_cache = torch.zeros(2, 4, 1, 8)
    v_cache = torch.zeros_like(k_cache)
    write_kv_reference(torch.ones(2, 1, 8), torch.ones(2, 1, 8), k_cache, v_cache, torch.tensor([3, -1]))
    assert k_cache.sum() == 8 and v_cache.sum() == 8


@pytest.mark.parametrize("kv_heads,group,head_dim", [(2, 1, 64), (2, 4, 128), (1, 7, 32)])
def test_paged_attention_reference_matches_dense_attention(kv_heads, group, head_dim):
    b = _paged_batch([37, 5, 70], [9, None, 16], kv_heads * group, kv_heads, head_dim, page_size=16)
    out = paged_attention_reference(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, 0.3)
    assert _rel_err(out, _dense_attention(b, 0.3)) < 1e-5


def test_paged_attention_reference_block_causal_hides_later_blocks():
    b = _paged_batch([45, 29], [None, 7], 4, 2, 32, page_size=8)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, 0.2)
    out = paged_attention_reference(*args, query_positions=b.positions, block_causal_size=12)
    assert _rel_err(out, _dense_attention(b, 0.2, block_causal_size=12)) < 1e-5
    assert _rel_err(out, _dense_attention(b, 0.2)) > 1e-2  # the mask really changed something


def test_paged_attention_reference_skips_sequences_without_queries():
    b = _paged_batch([20, 33, 7], [4, 0, 7], 2, 2, 16, page_size=4)
    out = paged_attention_reference(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, 0.25)
    assert out.shape == (11, 2, 16)
    assert _rel_err(out, _dense_attention(b, 0.25)) < 1e-5


def test_fused_confidence_reference_greedy_is_argmax_and_its_softmax_probability():
    logits = torch.randn(6, 300) * 4
    tokens, conf = fused_confidence_reference(logits.to(torch.bfloat16))
    probs = logits.to(torch.bfloat16).float().softmax(-1)
    assert torch.equal(tokens, probs.argmax(-1))
    torch.testing.assert_close(conf, probs.max(-1).values, rtol=1e-5, atol=0)


def test_fused_confidence_reference_samples_softmax_of_scaled_logits():
    rows, temp = 4000, 0.7
    logits = torch.randn(6).repeat(rows, 1)
    tokens, conf = fused_confidence_reference(logits, torch.full((rows,), temp), torch.arange(rows) * 7919 + 13)
    freq = torch.bincount(tokens, minlength=6).double() / rows
    expected = (logits[0].double() / temp).softmax(-1)
    assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / rows)
    torch.testing.assert_close(conf, logits[0].softmax(-1)[tokens], rtol=1e-6, atol=0)


def test_fused_confidence_reference_temperature_zero_rows_are_greedy():
    logits = torch.randn(4, 50)
    tokens, _ = fused_confidence_reference(logits, torch.tensor([0.0, 1.0, 0.0, 5.0]), torch.arange(4))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_fused_confidence_reference_same_seed_same_token():
    logits = torch.randn(3, 1000)
    a, _ = fused_confidence_reference(logits, torch.ones(3), torch.tensor([1, 2, 3]))
    b, _ = fused_confidence_reference(logits[1:2], torch.ones(1), torch.tensor([2]))
    assert a[1] == b[0]


def test_dispatch_uses_the_references_off_the_gpu():
    if INTERPRETING:
        pytest.skip("the interpreter sends CPU tensors to Triton")
    logits = torch.randn(3, 40)
    assert torch.equal(fused_confidence(logits)[0], fused_confidence_reference(logits)[0])
    b = _paged_batch([10], [3], 2, 2, 16, page_size=4)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, 0.25)
    assert torch.equal(paged_attention(*args), paged_attention_reference(*args))
    k_cache, v_cache = torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16)
    write_kv(b.keys[0][:2], b.values[0][:2], k_cache, v_cache, torch.tensor([0, 1]))
    assert torch.equal(k_cache[0, :2], b.keys[0][:2])


def test_rms_norm_reference_normalises_the_sum_with_the_residual():
    x, residual, weight = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5
    normed, summed = rms_norm_reference(x, weight, 1e-5, residual)
    assert torch.equal(summed, x + residual)
    s = summed.double()
    expected = s / (s.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight.double()
    torch.testing.assert_close(normed.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(rms_norm_reference(x, weight, 1e-5)[1], x)  # without a residual the input passes through


def _direct_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """float64 rotation of each (i, i + D/2) pair by position * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.double()[:, None, None] * inv_freq
    x1, x2 = x.double()[..., :half], x.double()[..., half:]
    return torch.cat((x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()), -1)


def test_rotary_reference_rotates_each_pair_by_its_positions_angle():
    inv_freq = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    cos, sin = rotary_table(inv_freq.float(), 4096)
    x, positions = torch.randn(9, 3, 64), torch.tensor([0, 1, 2, 17, 100, 511, 2048, 4000, 4095])
    out = rotary_reference(x, positions, cos, sin)
    torch.testing.assert_close(out.double(), _direct_rotary(x, positions), rtol=0, atol=2e-3)
    assert torch.equal(out[0], x[0])  # position 0 is the identity


def test_dispatch_of_the_elementwise_kernels_uses_the_references_off_the_gpu():
    if INTERPRETING:
        pytest.skip("the interpreter sends CPU tensors to Triton")
    x, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)[0])
    assert all(torch.equal(a, b) for a, b in zip(add_rms_norm(x, r, w, 1e-6), rms_norm_reference(x, w, 1e-6, r)))
    cos, sin = rotary_table(torch.rand(8), 50)
    q, positions = torch.randn(4, 2, 16), torch.tensor([3, 0, 49, 7])
    assert torch.equal(rotary(q, positions, cos, sin), rotary_reference(q, positions, cos, sin))
    assert torch.equal(silu_mul(x, r), silu_mul_reference(x, r))


# ----------------------------------------------------------------------------- Triton kernels (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads,head_dim", [(8, 128), (4, 64), (32, 128)])
def test_write_kv_kernel_matches_reference(kernel_device, kv_heads, head_dim):
    pages, page_size, tokens = 40, 16, 93
    cache = torch.randn(pages, page_size, kv_heads, head_dim, device=kernel_device).to(HALF)
    slots = torch.randperm(pages * page_size, device=kernel_device)[:tokens]
    slots[::10] = -1  # padding tokens
    # Strided views, as a fused QKV projection would hand over.
    kv = torch.randn(tokens, 2, kv_heads, head_dim, device=kernel_device).to(HALF)
    k, v = kv[:, 0], kv[:, 1]
    caches = [cache.clone() for _ in range(4)]
    write_kv_triton(k, v, caches[0], caches[1], slots)
    write_kv_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


ATTENTION_SHAPES = {
    # name: (seq_lens, queries per sequence (None = all), page_size)
    "decode": ([384, 1152, 333, 1000], [32, 32, 17, 32], 16),
    "prefill": ([300, 77, 129], [None, None, None], 64),
    "mixed": ([257, 40, 700, 3], [None, 5, 32, None], 16),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", sorted(ATTENTION_SHAPES))
@pytest.mark.parametrize("kv_heads,group,head_dim", [(4, 1, 128), (2, 4, 64), (2, 4, 128), (2, 7, 128)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_attention_kernel_matches_reference(kernel_device, shape, kv_heads, group, head_dim, num_splits):
    if INTERPRETING and (shape != "mixed" or head_dim != 64):
        pytest.skip("the interpreter is slow: one shape there")
    seq_lens, queries, page_size = ATTENTION_SHAPES[shape]
    b = _paged_batch(seq_lens, queries, kv_heads * group, kv_heads, head_dim, page_size, HALF, kernel_device)
    scale = head_dim**-0.5
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, scale)
    out = torch.full_like(b.q, float("nan"))
    paged_attention_triton(*args, out=out, num_splits=num_splits)
    ref = paged_attention_reference(*args)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_paged_attention_kernel_block_causal_matches_reference(kernel_device, group, num_splits):
    b = _paged_batch([200, 65, 96], [None, 20, 32], 2 * group, 2, 64, 16, HALF, kernel_device)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, 0.125)
    out = torch.full_like(b.q, float("nan"))
    paged_attention_triton(*args, b.positions, 32, out=out, num_splits=num_splits)
    ref = paged_attention_reference(*args, query_positions=b.positions, block_causal_size=32)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_paged_attention_kernel_handles_small_heads(kernel_device):
    # The bundled and test models have head_dim 16 (and GQA 2 for Dream's layout).
    b = _paged_batch([90, 13, 41], [None, 13, 8], 4, 2, 16, 16, HALF, kernel_device)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, 0.25)
    out = torch.full_like(b.q, float("nan"))
    paged_attention_triton(*args, out=out)
    assert _rel_err(out, paged_attention_reference(*args)) < 1e-2


@pytest.mark.gpu
def test_paged_attention_kernel_writes_nothing_for_sequences_without_queries(kernel_device):
    b = _paged_batch([50, 90, 20], [6, 0, 20], 4, 4, 64, 16, HALF, kernel_device)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, 0.125)
    out = torch.full_like(b.q, float("nan"))
    paged_attention(*args, out=out)
    assert not out.isnan().any()
    assert _rel_err(out, paged_attention_reference(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab,num_chunks", [(7, 126464, None), (300, 2048, None), (5, 20000, 3), (64, 126464, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_confidence_kernel_greedy_matches_reference(kernel_device, rows, vocab, num_chunks, dtype):
    if INTERPRETING and rows * vocab > 2e6:
        pytest.skip("the interpreter is slow")
    logits = (torch.randn(rows, vocab, device=kernel_device) * 3).to(dtype)
    tokens, conf = fused_confidence_triton(logits, num_chunks=num_chunks)
    ref_tokens, ref_conf = fused_confidence_reference(logits)
    assert torch.equal(tokens, ref_tokens)  # bf16 ties included: both keep the first maximum
    torch.testing.assert_close(conf, ref_conf, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fused_confidence_kernel_samples_softmax_of_scaled_logits(kernel_device, temperature):
    if INTERPRETING and temperature != 1.0:
        pytest.skip("the interpreter is slow: one temperature there")
    rows = 1000 if INTERPRETING else 40000
    base = torch.randn(8, device=kernel_device) * 2
    logits = base.repeat(rows, 1)
    seeds = torch.randint(0, 2**62, (rows,), device=kernel_device)
    tokens, conf = fused_confidence_triton(logits, torch.full((rows,), temperature, device=kernel_device), seeds)
    freq = torch.bincount(tokens, minlength=8).double() / rows
    expected = (base.double() / temperature).softmax(-1)
    assert (freq - expected).abs().max() < 4 * math.sqrt(0.25 / rows)
    torch.testing.assert_close(conf, base.softmax(-1)[tokens], rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_fused_confidence_kernel_sample_depends_only_on_row_and_seed(kernel_device):
    logits = torch.randn(6, 30000, device=kernel_device).to(torch.bfloat16)
    temp = torch.tensor([0.0, 0.8, 1.0, 0.0, 1.5, 1.0], device=kernel_device)
    seeds = torch.tensor([5, 6, 7, 8, 9, 2**40 + 3], device=kernel_device)
    tokens, conf = fused_confidence_triton(logits, temp, seeds, num_chunks=4)
    again, _ = fused_confidence_triton(logits, temp, seeds, num_chunks=1)
    alone, alone_conf = fused_confidence_triton(logits[4:5], temp[4:5], seeds[4:5])
    greedy, _ = fused_confidence_reference(logits)
    assert torch.equal(tokens, again)  # chunking does not change the draw
    assert tokens[4] == alone[0]  # nor does the rest of the batch
    torch.testing.assert_close(conf[4], alone_conf[0], rtol=1e-5, atol=0)
    assert tokens[0] == greedy[0] and tokens[3] == greedy[3]  # temperature 0 is greedy
    ref_conf = logits.float().softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(conf, ref_conf, rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (93, 4096), (37, 384), (16, 100)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_reference(kernel_device, rows, hidden, with_residual):
    # Rows of a wider tensor: the kernel honours the row stride.
    x = torch.randn(rows, hidden + 8, device=kernel_device).to(HALF)[:, :hidden]
    residual = torch.randn(rows, hidden, device=kernel_device).to(HALF) * 4 if with_residual else None
    weight = (torch.rand(hidden, device=kernel_device) + 0.5).to(HALF)
    normed, summed = rms_norm_triton(x, weight, 1e-5, residual)
    ref_normed, ref_summed = rms_norm_reference(x, weight, 1e-5, residual)
    assert torch.equal(summed, ref_summed)  # the residual add rounds exactly as PyTorch's
    # A different summation order: one rounding step apart at most (bf16's default tolerance).
    torch.testing.assert_close(normed, ref_normed, rtol=1.6e-2, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 32, 128), (28, 4, 128), (6, 6, 64)])
def test_rotary_kernel_matches_reference_on_views_of_a_fused_qkv(kernel_device, heads, kv_heads, head_dim):
    tokens, max_position = 77, 4096
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=kernel_device) / head_dim)
    cos, sin = rotary_table(inv_freq.float(), max_position)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=kernel_device).to(HALF)
    q, k = qkv[:, :heads], qkv[:, heads : heads + kv_heads]
    positions = torch.randint(0, max_position, (tokens,), device=kernel_device)
    positions[:3] = torch.tensor([0, max_position - 1, 1])
    for x in (q, k):
        torch.testing.assert_close(rotary_triton(x, positions, cos, sin), rotary_reference(x, positions, cos, sin))
    assert torch.equal(rotary_triton(q, positions, cos, sin)[0], q[0])  # position 0 is the identity


@pytest.mark.gpu
@pytest.mark.parametrize("rows,width", [(1, 12288), (33, 1000), (5, 7)])
def test_silu_mul_kernel_matches_reference_on_the_halves_of_a_fused_gate_up(kernel_device, rows, width):
    gate_up = torch.randn(rows, 2 * width, device=kernel_device).to(HALF)
    gate_up[:, :width] *= 4
    gate, up = gate_up.split(width, dim=-1)
    # exp differs from PyTorch's by an ulp here and there: one rounding step apart at most.
    torch.testing.assert_close(silu_mul_triton(gate, up), silu_mul_reference(gate, up), rtol=1.6e-2, atol=1e-5)

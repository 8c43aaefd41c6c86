"""Kernel timings at LLaDA-8B shapes, against the references, torch baselines and the bandwidth floor.

    python benchmarks/kernel_bench.py            # needs a CUDA GPU; prints the table last
    python benchmarks/kernel_bench.py --only moe # one kernel family
    python benchmarks/kernel_bench.py --gemms    # only the bf16 / FP8 GEMM table

LLaDA-8B: 32 heads (no GQA), head_dim 128, vocabulary 126,464, bf16, pages of
16 tokens handed out in shuffled order. Each row times the Triton kernel
captured in a CUDA graph (as the engine runs it; "eager" adds the Python
launch cost), the baseline it has to beat, and the plain-PyTorch reference:

- paged attention: decode-like steps (32 active queries per sequence over
  384 or 1152 keys) and prefill-like ones (every position active); the
  baseline is dense SDPA (flash) on contiguous K/V, i.e. what attention
  costs without pages or ragged batches;
- fused confidence: N rows x 126,464 logits; the baseline is torch's
  softmax + max (the probabilities materialised);
- KV write: T tokens x 32 heads x 128 into the pool; baseline torch index_put;
- MoE experts: one layer of LLaDA2.0-mini (256 experts, top-8, hidden 2048,
  expert intermediate 512) and of LLaDA-MoE (64 experts, top-8, 2048, 1024)
  for T tokens under uniform random routing, against the per-expert loop;
  "moe_align" rows time the sort of the (token, expert) pairs into blocks
  alone, which the kernel rows include.

A second table times the projections' GEMMs at LLaDA-8B shapes (qkv, o,
gate_up, down; T = 32 rows, a batch-1 dual step, and 2048, batch 64) in bf16
(F.linear) and in FP8 (`kernels.fp8_linear`: the per-token quantization of the
input plus `torch._scaled_mm`, as `quantization="fp8"` runs them; also each
part alone, and without fast accumulation), beside each one's floor:
max(bytes / 3.0 TB/s, FLOPs / the nominal dense matrix rate, 989 TFLOP/s bf16
and 1979 FP8 on an H100 SXM).

GB/s counts each tensor the kernel must touch once (K/V read, q read, out
written; logits read; K/V read and written; the weights of the experts that
received tokens, x read and out written), so "%BW" is the distance to the
memory floor, measured against the device-to-device copy rate and against
the nominal 3.0 TB/s. "floor us" is the larger of those bytes at the copy
rate and the FLOPs at the nominal dense bf16 matrix rate (989 TFLOP/s);
"%floor" is floor / triton. Inputs rotate over several copies whose total exceeds
the L2 cache, so repeated runs do not measure the cache.
"""

from __future__ import annotations

import argparse
import math
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton.testing

from unmask.kernels.confidence import fused_confidence_reference, fused_confidence_triton
from unmask.kernels.fp8_linear import FAST_ACCUMULATION, fp8_linear_scaled_mm
from unmask.kernels.fp8_quant import quantize_rows, quantize_rows_reference
from unmask.kernels.kv_write import write_kv_reference, write_kv_triton
from unmask.kernels.moe import MoeTiles, align_to_blocks, moe_experts_reference, moe_experts_triton, moe_tiles
from unmask.kernels.paged_attention import paged_attention_reference, paged_attention_triton

HEADS, KV_HEADS, HEAD_DIM, VOCAB, PAGE_SIZE = 32, 32, 128, 126464, 16
HIDDEN, FFN = 4096, 12288
NOMINAL_BW = 3.0e12
NOMINAL_BF16_RATE, NOMINAL_FP8_RATE = 989e12, 1979e12  # H100 SXM dense matrix FLOP/s
L2_FOOTPRINT = 160 * 2**20  # rotate inputs until a pass touches this many bytes (H100 L2: 50 MB)
DTYPE = torch.bfloat16
DEVICE = "cuda"


@dataclass
class Row:
    kernel: str
    case: str
    triton_us: float
    eager_us: float
    baseline_us: float | None
    reference_us: float | None
    bytes_moved: float
    flops: float = 0.0


def _graph_us(fn: Callable[[], object]) -> float:
    """Median µs of fn replayed from a CUDA graph."""
    # do_bench_cudagraph runs fn on a side stream: the inputs made on the default stream must be ready.
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def _eager_us(fn: Callable[[], object], rep: int = 50) -> float:
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e3


def _copies(bytes_per_set: int) -> int:
    return max(1, min(16, math.ceil(L2_FOOTPRINT / bytes_per_set)))


def _rotating(fns: list[Callable[[], object]]) -> Callable[[], None]:
    """One call runs every input set once; divide its time by len(fns)."""

    def run() -> None:
        for fn in fns:
            fn()

    return run


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (read + write), the practical memory ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (_graph_us(lambda: dst.copy_(src)) * 1e-6)


# ----------------------------------------------------------------------------- attention


@dataclass
class AttentionInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    page_table: torch.Tensor

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens, self.page_table, HEAD_DIM**-0.5)


def _attention_inputs(batch: int, keys: int, queries: int) -> AttentionInputs:
    pages_per_seq = -(-keys // PAGE_SIZE)
    num_pages = batch * pages_per_seq
    cache_shape = (num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    page_table = torch.randperm(num_pages, device=DEVICE).to(torch.int32).view(batch, pages_per_seq)
    return AttentionInputs(
        q=torch.randn(batch * queries, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE),
        k_cache=torch.randn(cache_shape, device=DEVICE, dtype=DTYPE),
        v_cache=torch.randn(cache_shape, device=DEVICE, dtype=DTYPE),
        cu_seqlens_q=torch.arange(0, batch + 1, device=DEVICE, dtype=torch.int32) * queries,
        seq_lens=torch.full((batch,), keys, device=DEVICE, dtype=torch.int32),
        page_table=page_table,
    )


def _dense_inputs(batch: int, keys: int, queries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(batch, HEADS, queries, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    return q, k, torch.randn_like(k)


def _attention_sets(batch: int, keys: int, queries: int) -> tuple[list[AttentionInputs], int]:
    """Enough input sets to rotate out of L2, and the bytes one call must move."""
    kv_bytes = 2 * batch * keys * KV_HEADS * HEAD_DIM * 2
    qo_bytes = 2 * batch * queries * HEADS * HEAD_DIM * 2
    sets = [_attention_inputs(batch, keys, queries) for _ in range(_copies(kv_bytes + qo_bytes))]
    return sets, kv_bytes + qo_bytes


def _attention_kernels(sets: list[AttentionInputs], **kernel_options) -> list[Callable[[], object]]:
    outs = [torch.empty_like(s.q) for s in sets]
    return [lambda s=s, o=o: paged_attention_triton(*s.args(), out=o, **kernel_options) for s, o in zip(sets, outs)]


def bench_attention(batch: int, keys: int, queries: int, **kernel_options) -> Row:
    sets, bytes_moved = _attention_sets(batch, keys, queries)
    kernel = _attention_kernels(sets, **kernel_options)
    dense = [_dense_inputs(batch, keys, queries) for _ in sets]
    baseline = [lambda d=d: F.scaled_dot_product_attention(*d) for d in dense]
    n = len(sets)
    return Row(
        kernel="paged_attention",
        case=f"B={batch:<3d} q={queries:<5d} k={keys}",
        triton_us=_graph_us(_rotating(kernel)) / n,
        eager_us=_eager_us(kernel[0]),
        baseline_us=_graph_us(_rotating(baseline)) / n,
        reference_us=_eager_us(lambda: paged_attention_reference(*sets[0].args()), rep=30),
        bytes_moved=bytes_moved,
        flops=4.0 * batch * queries * keys * HEADS * HEAD_DIM,
    )


def _sweep_cell(measure: Callable[[], tuple[torch.Tensor, float]], ref: torch.Tensor, width: int) -> str:
    """One variant of a sweep: its µs per call and relative error vs `ref`, BAD past 1e-2, or the failure's name."""
    try:
        out, us = measure()
        err = ((out.float() - ref).norm() / ref.norm()).item()
    except Exception as error:  # noqa: BLE001 - a failed variant should not end the sweep
        return f"{type(error).__name__[:width]:>{width}s}"
    return f"{us:{width - 8}.1f} ({err:.0e})" if err < 1e-2 else f"{'BAD ' + format(err, '.0e'):>{width}s}"


DECODE_VARIANTS = {
    "default": {},
    "splits=1": dict(num_splits=1),
    "stages=3": dict(num_stages=3),
    "n=64,stages=3": dict(block_n=64, num_stages=3),
}
PREFILL_VARIANTS = {
    "default": {},
    "m=128,n=64": dict(block_m=128, block_n=64),
    "stages=3": dict(num_stages=3),
    "m=64,w=4": dict(block_m=64, num_warps=4),
    "m=64,n=64,w=4": dict(block_m=64, block_n=64, num_warps=4),
}


DECODE_SHAPES = ((1, 1152, 32), (8, 1152, 32))  # (batch, keys, queries per sequence)
PREFILL_SHAPES = ((1, 384, 384), (8, 384, 384))


def sweep_attention(decode_shapes=DECODE_SHAPES, prefill_shapes=PREFILL_SHAPES, base: dict | None = None) -> None:
    """Launch options around the defaults, each checked against the reference, to see that the defaults hold."""
    print("\nattention sweep: graph us per call (rel. error vs the reference)")
    for shapes, variants in ((decode_shapes, DECODE_VARIANTS), (prefill_shapes, PREFILL_VARIANTS)):
        print(f"  {'case':<24s} " + " ".join(f"{name:>15s}" for name in variants))
        for batch, keys, queries in shapes:
            sets, _ = _attention_sets(batch, keys, queries)
            ref = paged_attention_reference(*sets[0].args()).float()
            cells = []
            for options in variants.values():

                def measure(options: dict = options) -> tuple[torch.Tensor, float]:
                    kernels = _attention_kernels(sets, **{**(base or {}), **options})
                    return kernels[0](), _graph_us(_rotating(kernels)) / len(sets)

                cells.append(_sweep_cell(measure, ref, 15))
            print(f"  B={batch:<3d} q={queries:<5d} k={keys:<5d}   " + " ".join(f"{c:>15s}" for c in cells))
            del sets, ref
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- confidence


def bench_confidence(rows: int, dtype: torch.dtype, temperature: float | None) -> Row:
    logit_bytes = rows * VOCAB * torch.empty((), dtype=dtype).element_size()
    sets = [torch.randn(rows, VOCAB, device=DEVICE).mul_(3).to(dtype) for _ in range(_copies(logit_bytes))]
    temps = None if temperature is None else torch.full((rows,), temperature, device=DEVICE)
    seeds = None if temperature is None else torch.arange(rows, device=DEVICE) * 7919
    kernel = [lambda x=x: fused_confidence_triton(x, temps, seeds) for x in sets]
    baseline = [lambda x=x: torch.softmax(x.float(), -1).max(-1) for x in sets]
    n = len(sets)
    mode = "greedy" if temperature is None else f"T={temperature}"
    if temperature is None:
        reference_us = _eager_us(lambda: fused_confidence_reference(sets[0]), rep=30)
    else:  # the sampled reference loops over rows on the host: time 32 rows and scale
        few = min(rows, 32)
        reference_us = _eager_us(lambda: fused_confidence_reference(sets[0][:few], temps[:few], seeds[:few]), rep=5)
        reference_us *= rows / few
    return Row(
        kernel="fused_confidence",
        case=f"N={rows:<5d} {str(dtype).removeprefix('torch.'):<8s} {mode}",
        triton_us=_graph_us(_rotating(kernel)) / n,
        eager_us=_eager_us(kernel[0]),
        baseline_us=_graph_us(_rotating(baseline)) / n,
        reference_us=reference_us,
        bytes_moved=logit_bytes,
    )


# ----------------------------------------------------------------------------- KV write


def bench_kv_write(tokens: int) -> Row:
    pages = max(64, 4 * tokens // PAGE_SIZE)
    token_bytes = tokens * KV_HEADS * HEAD_DIM * 2
    caches = [torch.randn(pages, PAGE_SIZE, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in range(2)]
    sets = []
    for _ in range(_copies(4 * token_bytes)):
        slots = torch.randperm(pages * PAGE_SIZE, device=DEVICE)[:tokens]
        kv = torch.randn(tokens, 2, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        sets.append((kv[:, 0], kv[:, 1], slots))
    kernel = [lambda s=s: write_kv_triton(s[0], s[1], *caches, s[2]) for s in sets]
    flat = [c.view(-1, KV_HEADS, HEAD_DIM) for c in caches]
    baseline = [lambda s=s: (flat[0].index_put_((s[2],), s[0]), flat[1].index_put_((s[2],), s[1])) for s in sets]
    n = len(sets)
    return Row(
        kernel="write_kv",
        case=f"T={tokens}",
        triton_us=_graph_us(_rotating(kernel)) / n,
        eager_us=_eager_us(kernel[0]),
        baseline_us=_graph_us(_rotating(baseline)) / n,
        reference_us=_eager_us(lambda: write_kv_reference(*sets[0][:2], *caches, sets[0][2])),
        bytes_moved=4 * token_bytes,
    )


# ----------------------------------------------------------------------------- MoE experts


MOE_LAYERS = {  # name: (experts, top_k, hidden, expert intermediate)
    "llada2-mini": (256, 8, 2048, 512),
    "llada-moe": (64, 8, 2048, 1024),
}
MOE_TOKENS = (32, 256, 2048)


@dataclass
class MoeInputs:
    x: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor

    def args(self) -> tuple:
        return (self.x, self.gate_up, self.down, self.topk_ids, self.topk_weights)


def _moe_inputs(layer: str, tokens: int) -> MoeInputs:
    """One layer's experts (larger than L2: one set suffices) and uniform random top-k routing."""
    experts, top_k, dim, inter = MOE_LAYERS[layer]
    weights, ids = torch.rand(tokens, experts, device=DEVICE).topk(top_k, dim=-1)
    return MoeInputs(
        x=torch.randn(tokens, dim, device=DEVICE, dtype=DTYPE),
        gate_up=torch.randn(experts, 2 * inter, dim, device=DEVICE, dtype=DTYPE) * dim**-0.5,
        down=torch.randn(experts, dim, inter, device=DEVICE, dtype=DTYPE) * inter**-0.5,
        topk_ids=ids,
        topk_weights=weights / weights.sum(-1, keepdim=True),
    )


def _moe_work(inputs: MoeInputs) -> tuple[float, float]:
    """Bytes the layer must move (each routed expert's weights once, x read, out written) and its FLOPs."""
    expert_params = inputs.gate_up[0].numel() + inputs.down[0].numel()
    experts_hit = inputs.topk_ids.unique().numel()
    size = inputs.x.element_size()
    return (experts_hit * expert_params + 2 * inputs.x.numel()) * size, 2.0 * inputs.topk_ids.numel() * expert_params


def bench_moe(layer: str, tokens: int) -> list[Row]:
    inputs = _moe_inputs(layer, tokens)
    bytes_moved, flops = _moe_work(inputs)
    kernel = lambda: moe_experts_triton(*inputs.args())  # noqa: E731
    experts = MOE_LAYERS[layer][0]
    block_m = moe_tiles(inputs.topk_ids.numel(), experts, DTYPE).block_m
    align = lambda: align_to_blocks(inputs.topk_ids, experts, block_m)  # noqa: E731
    case = f"{layer} T={tokens}"
    return [
        Row(
            kernel="moe_experts",
            case=case,
            triton_us=_graph_us(kernel),
            eager_us=_eager_us(kernel),
            baseline_us=None,
            reference_us=_eager_us(lambda: moe_experts_reference(*inputs.args()), rep=20),
            bytes_moved=bytes_moved,
            flops=flops,
        ),
        Row("moe_align", case, _graph_us(align), _eager_us(align), None, None, bytes_moved=inputs.topk_ids.numel() * 8),
    ]


MOE_VARIANTS = {
    "default": None,
    "m16,n64,k128": MoeTiles(16, 64, 128, num_warps=4, num_stages=4),
    "m16,n128,k128": MoeTiles(16, 128, 128, num_warps=4, num_stages=3),
    "m32,n64,k64": MoeTiles(32, 64, 64, num_warps=4, num_stages=4),
    "m64,n64,k64": MoeTiles(64, 64, 64, num_warps=4, num_stages=4),
    "m64,n128,k64,w8": MoeTiles(64, 128, 64, num_warps=8, num_stages=3),
    "m64,n128,k64,w4": MoeTiles(64, 128, 64, num_warps=4, num_stages=3),
}


def sweep_moe() -> None:
    """Tiles around `moe_tiles`' choice, each checked against the reference, to see that the choice holds."""
    print("\nMoE sweep: graph us per call (rel. error vs the reference)")
    print(f"  {'case':<24s} " + " ".join(f"{name:>17s}" for name in MOE_VARIANTS))
    for layer in MOE_LAYERS:
        for tokens in MOE_TOKENS:
            inputs = _moe_inputs(layer, tokens)
            ref = moe_experts_reference(*inputs.args()).float()
            cells = []
            for tiles in MOE_VARIANTS.values():
                run = lambda t=tiles: moe_experts_triton(*inputs.args(), tiles=t)  # noqa: E731
                cells.append(_sweep_cell(lambda run=run: (run(), _graph_us(run)), ref, 17))
            print(f"  {layer + ' T=' + str(tokens):<24s} " + " ".join(f"{c:>17s}" for c in cells))
            del inputs, ref
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- FP8 GEMMs

GEMM_SHAPES = (("qkv", 3 * HIDDEN, HIDDEN), ("o", HIDDEN, HIDDEN), ("gate_up", 2 * FFN, HIDDEN), ("down", HIDDEN, FFN))


@dataclass
class GemmRow:
    name: str
    tokens: int
    bf16_us: float
    fp8_us: float  # `fp8_linear_scaled_mm`: the input's quantization + _scaled_mm, as quantization="fp8" runs it
    quantize_us: float
    scaled_mm_us: float
    scaled_mm_exact_us: float  # without fast accumulation
    bf16_floor_us: float
    fp8_floor_us: float


def _floor_us(tokens: int, n: int, k: int, weight_bytes: int, rate: float) -> float:
    moved = n * k * weight_bytes + tokens * k * 2 + tokens * n * 2  # weight, bf16 input, bf16 output
    return max(moved / NOMINAL_BW, 2 * tokens * n * k / rate) * 1e6


@dataclass
class GemmInputs:
    x: torch.Tensor  # [T, K] bf16
    weight: torch.Tensor  # [N, K] bf16
    qw: torch.Tensor  # [N, K] e4m3
    scale_w: torch.Tensor  # [1, N] float32
    qx: torch.Tensor  # [T, K] e4m3
    scale_x: torch.Tensor  # [T, 1] float32

    @classmethod
    def random(cls, tokens: int, n: int, k: int) -> GemmInputs:
        weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02
        qw, scale_w = quantize_rows_reference(weight)
        x = torch.randn(tokens, k, device=DEVICE, dtype=DTYPE)
        return cls(x, weight, qw, scale_w.reshape(1, -1), *quantize_rows(x))

    def scaled_mm(self, qx: torch.Tensor, scale_x: torch.Tensor, fast: bool) -> torch.Tensor:
        return torch._scaled_mm(qx, self.qw.t(), scale_a=scale_x, scale_b=self.scale_w, out_dtype=DTYPE, use_fast_accum=fast)


def bench_gemm(name: str, tokens: int, n: int, k: int) -> GemmRow:
    sets = [GemmInputs.random(tokens, n, k) for _ in range(_copies(n * k * 2))]

    def timed(fn: Callable[[GemmInputs], object]) -> float:
        return _graph_us(_rotating([lambda g=g: fn(g) for g in sets])) / len(sets)

    return GemmRow(
        name, tokens,
        bf16_us=timed(lambda g: F.linear(g.x, g.weight)),
        fp8_us=timed(lambda g: fp8_linear_scaled_mm(g.x, g.qw, g.scale_w)),
        quantize_us=timed(lambda g: quantize_rows(g.x)),
        scaled_mm_us=timed(lambda g: g.scaled_mm(g.qx, g.scale_x, fast=FAST_ACCUMULATION)),
        scaled_mm_exact_us=timed(lambda g: g.scaled_mm(g.qx, g.scale_x, fast=False)),
        bf16_floor_us=_floor_us(tokens, n, k, 2, NOMINAL_BF16_RATE),
        fp8_floor_us=_floor_us(tokens, n, k, 1, NOMINAL_FP8_RATE),
    )


def print_gemm_table(rows: list[GemmRow]) -> None:
    header = (
        f"\n{'gemm':<8s} {'T':>5s} {'bf16 us':>8s} {'floor':>7s} {'fp8 us':>8s} {'floor':>7s} {'fp8/bf16':>8s} "
        f"{'quant us':>8s} {'mm us':>8s} {'mm exact':>8s}"
    )
    _print_header(header)
    for r in rows:
        print(
            f"{r.name:<8s} {r.tokens:5d} {r.bf16_us:8.1f} {r.bf16_floor_us:7.1f} {r.fp8_us:8.1f} {r.fp8_floor_us:7.1f} "
            f"{r.fp8_us / r.bf16_us:8.2f} {r.quantize_us:8.1f} {r.scaled_mm_us:8.1f} {r.scaled_mm_exact_us:8.1f}"
        )
    print(f"fp8 us: the per-token input quantization (quant us) then torch._scaled_mm (mm us, fast accumulation "
          f"{'on' if FAST_ACCUMULATION else 'off'} as served); mm exact: without fast accumulation; "
          "floors at 3.0 TB/s and the nominal dense rates")


def sweep_gemms() -> None:
    rows = []
    for tokens in (32, 2048):
        for name, n, k in GEMM_SHAPES:
            try:
                rows.append(bench_gemm(name, tokens, n, k))
            except Exception:  # noqa: BLE001 - report the failure and keep the rest of the table
                traceback.print_exc()
            torch.cuda.empty_cache()
    print_gemm_table(rows)


# ----------------------------------------------------------------------------- report


def _print_header(header: str) -> None:
    print(header)
    print("-" * len(header.strip("\n")))


def _fmt(value: float | None, spec: str = "9.1f") -> str:
    return format(value, spec) if value is not None else " " * (int(spec.split(".")[0]) - 1) + "-"


def print_table(rows: list[Row], copy_bw: float) -> None:
    print(f"\ndevice-to-device copy: {copy_bw / 1e12:.2f} TB/s (read + write); nominal floor uses {NOMINAL_BW / 1e12:.1f} TB/s")
    header = (
        f"{'kernel':<17s} {'case':<27s} {'triton us':>9s} {'eager us':>9s} {'base us':>9s} {'x base':>7s} "
        f"{'ref us':>9s} {'x ref':>7s} {'GB/s':>7s} {'%copy':>6s} {'%3TB/s':>6s} {'TFLOP/s':>7s} {'floor us':>8s} {'%floor':>6s}"
    )
    _print_header(header)
    for r in rows:
        gbs = r.bytes_moved / (r.triton_us * 1e-6) / 1e9
        x_base = r.baseline_us / r.triton_us if r.baseline_us else None
        x_ref = r.reference_us / r.triton_us if r.reference_us else None
        tflops = r.flops / (r.triton_us * 1e-6) / 1e12 if r.flops else None
        floor_us = max(r.bytes_moved / copy_bw, r.flops / NOMINAL_BF16_RATE) * 1e6
        print(
            f"{r.kernel:<17s} {r.case:<27s} {r.triton_us:9.1f} {r.eager_us:9.1f} {_fmt(r.baseline_us)} {_fmt(x_base, '7.2f')} "
            f"{_fmt(r.reference_us)} {_fmt(x_ref, '7.1f')} {gbs:7.0f} {100 * gbs * 1e9 / copy_bw:6.1f} "
            f"{100 * gbs * 1e9 / NOMINAL_BW:6.1f} {_fmt(tflops, '7.1f')} {floor_us:8.1f} {100 * floor_us / r.triton_us:6.1f}"
        )
    print("x base / x ref: how many times faster than the baseline / the reference (>1: the kernel wins)")


def _cases(attention_options: dict) -> dict[str, list[Callable[[], list[Row]]]]:
    """The table's rows by kernel family, each case a call that measures its rows."""
    attention = [lambda b=b, k=k: [bench_attention(b, k, 32, **attention_options)] for k in (384, 1152) for b in (1, 8, 64)]
    attention += [lambda b=b, k=k: [bench_attention(b, k, k, **attention_options)] for b, k in ((1, 384), (1, 1152), (8, 384))]
    confidence = [lambda n=n: [bench_confidence(n, torch.bfloat16, None)] for n in (32, 128, 512, 2048)]
    confidence.append(lambda: [bench_confidence(512, torch.float32, None)])
    confidence += [lambda n=n: [bench_confidence(n, torch.bfloat16, 1.0)] for n in (32, 2048)]
    return {
        "attention": attention,
        "confidence": confidence,
        "kv_write": [lambda t=t: [bench_kv_write(t)] for t in (32, 2048)],
        "moe": [lambda name=name, t=t: bench_moe(name, t) for name in MOE_LAYERS for t in MOE_TOKENS],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-stages", type=int, help="attention pipelining depth (default: the kernel's)")
    parser.add_argument("--block-n", type=int, help="attention keys per step (default: the kernel's)")
    parser.add_argument("--only", choices=("attention", "confidence", "kv_write", "moe"), help="one kernel family (default: all)")
    parser.add_argument("--gemms", action="store_true", help="only the bf16 / FP8 GEMM table")
    args = parser.parse_args()
    if args.gemms:
        sweep_gemms()
        return
    attention_options = {k: v for k, v in (("num_stages", args.num_stages), ("block_n", args.block_n)) if v}
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  {attention_options}")
    families = {name: cases for name, cases in _cases(attention_options).items() if args.only in (None, name)}
    rows: list[Row] = []
    for case in (case for cases in families.values() for case in cases):
        try:
            rows.extend(case())
        except Exception:  # noqa: BLE001 - report the failure and keep the rest of the table
            traceback.print_exc()
        torch.cuda.empty_cache()
    print_table(rows, copy_bandwidth())  # the copy last, on a warm GPU
    if args.only is None:
        sweep_gemms()
    if "attention" in families:
        sweep_attention(base=attention_options)
    if "moe" in families:
        sweep_moe()


if __name__ == "__main__":
    main()

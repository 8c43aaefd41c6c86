"""Offline throughput of the engine against the physical floor of the GPU.

    python benchmarks/throughput.py --arch llada-8b            # the full table on a GPU
    python benchmarks/throughput.py --arch tiny --device cpu   # a smoke run anywhere
    python benchmarks/throughput.py --arch llada-8b --tensor-parallel-size 2   # over 2 GPUs
    python benchmarks/throughput.py --arch sdar-8b             # a block-causal model: none and block
    python benchmarks/throughput.py --arch llada-8b --quantization none fp8   # bf16 and FP8 weights, and their ratios

Builds a model with random weights directly on the device (no checkpoint),
admits `batch` requests of `prompt` random tokens and a 256-token canvas, and
drives the real engine step by step. For every configuration it prints the
milliseconds of a refresh step (whole sequence) and of a cached step, the
steady-state generated tokens/s over a block cycle, and beside them the floor:
max(weight + KV bytes / bandwidth, FLOPs / matrix rate) per step, the tokens/s
a cycle of steps at their floors would give (the schedule's ceiling on this
GPU) and the model-FLOP utilisation. The reference (`none`) and the caches run in the same
process, so the ratios compare like with like. One engine, sized for the
largest configuration, serves them all.

A block-causal preset (`sdar-*`, `fastdllm-v2-*`) decodes in its own blocks
with the caches `none` and `block` by default. Its schedule has no refresh:
the "refresh" columns are a block's first step (the previous block once more
with the current one; Fast-dLLM v2: the previous block alone), the cached ones
the current block alone, both over the keys up to the end of the second block
(where the cycle is measured).

With `--tensor-parallel-size N` the model is split over N GPUs (each rank
draws random weights for its own shard) and the floor is that of N GPUs
together: bytes and FLOPs divided evenly, communication not counted.

`--quantization none fp8` measures the model with its bf16 weights, then with
FP8 weights (the engine's `quantization="fp8"`), one engine after the other in
the same process, and ends with each configuration's fp8 / none ratios of
step times and tokens/s. The fp8 floor reads the projections' weights at one
byte each and runs their products at the FP8 matrix rate (twice bf16's); the
embedding, the LM head and attention stay bf16. MFU is against the bf16 rate
throughout, so the two tables compare.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import tempfile
from dataclasses import dataclass, replace

import torch

from unmask.engine.config import QUANTIZATIONS, EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.models.checkpoint import random_weights
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.loader import LoadedModel, check_quantization, quantize
from unmask.engine.models.make_random import PRESETS, build_tokenizer
from unmask.engine.parallel import RandomShards
from unmask.engine.params import SamplingParams

BANDWIDTH = 3.0e12  # H100 HBM3, measured device-to-device copy (bytes read + written)
MATMUL_RATE = 790e12  # H100 bf16 dense, measured 8192^3 product
FP8_SPEEDUP = 2.0  # Hopper's FP8 dense matrix rate over its bf16 rate (nominal: 1979 vs 989 TFLOP/s)


@dataclass
class Row:
    batch: int
    prompt: int
    tokens_per_step: int
    cache: str
    refresh_ms: float
    cached_ms: float
    tokens_per_s: float
    floor_refresh_ms: float
    floor_cached_ms: float
    ceiling_tokens_per_s: float  # the tokens/s of a block cycle whose every step ran at its floor
    mfu: float


def model_config(arch: str) -> ModelConfig:
    # eos_token_id -1: random weights know no end-of-text, so every request runs its whole canvas.
    return replace(PRESETS[arch], eos_token_id=-1, max_position=8192)


def build_model(arch: str, device: torch.device, dtype: torch.dtype, quantization: str = "none") -> LoadedModel:
    cfg = model_config(arch)
    check_quantization(quantization, device, dtype)
    tokenizer = build_tokenizer(512, tempfile.mkdtemp())
    model = random_weights(cfg, dtype, device)
    quantize(model, quantization)
    return LoadedModel(model, cfg, tokenizer, device, dtype)


@dataclass(frozen=True)
class BodyWeights:
    """The model body's weights at one step, split by what FP8 quantizes (attention and dense SwiGLUs)."""

    read_quantizable: float  # weights the step reads that FP8 stores in one byte
    read_kept: float  # weights the step reads that stay in the model's dtype (routers, experts)
    per_position: float  # weights each computed position multiplies (2 FLOPs each)


def body_weights(cfg: ModelConfig, positions: int) -> BodyWeights:
    """The body's weights a step of `positions` computed positions reads and multiplies.

    A dense model reads and multiplies every weight. A mixture-of-experts layer
    reads its router, its shared expert and the routed experts its positions
    choose: with routing spread evenly, E * (1 - (1 - top_k / E) ** positions)
    of the E experts in expectation (the active-parameter floor); each position
    multiplies the router, the shared expert and top_k experts.
    """
    hidden, head_dim = cfg.hidden_size, cfg.head_dim
    attention = 2 * hidden * head_dim * (cfg.num_heads + cfg.num_kv_heads)
    dense_ffn = 3 * hidden * cfg.intermediate_size
    moe = cfg.moe
    moe_layers = 0 if moe is None else sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    dense_layers = cfg.num_layers - moe_layers
    quantizable = cfg.num_layers * attention + dense_layers * dense_ffn
    if moe is None:
        return BodyWeights(quantizable, 0.0, quantizable)
    expert = 3 * hidden * moe.expert_intermediate_size
    always = hidden * moe.num_experts + 3 * hidden * moe.shared_intermediate_size  # router + shared expert
    touched = moe.num_experts * (1 - (1 - moe.top_k / moe.num_experts) ** positions)
    return BodyWeights(
        quantizable, moe_layers * (always + touched * expert), quantizable + moe_layers * (always + moe.top_k * expert)
    )


def step_floor(
    cfg: ModelConfig, batch: int, tokens: int, keys: int, dtype_bytes: int, quantization: str = "none"
) -> tuple[float, float]:
    """(seconds, FLOPs) floor of one step: each of `batch` sequences computes `tokens` positions over `keys` keys.

    Bytes: the body's weights the step reads (`body_weights`: all of a dense
    model's, the chosen experts of a mixture of experts) and the LM head once
    (it runs on the block's rows), plus every cached K/V once. FLOPs: 2 per
    multiplied weight per computed position (the LM head only on the block's
    rows, ignored) plus 4 * layers * tokens * keys * heads * head_dim for QK^T
    and PV. With `quantization="fp8"` the projections FP8 quantizes take one
    byte per weight and their products run at `FP8_SPEEDUP` times the matrix rate.
    """
    fp8 = quantization == "fp8"
    body = body_weights(cfg, batch * tokens)
    weight_bytes = (
        body.read_quantizable * (1 if fp8 else dtype_bytes)
        + body.read_kept * dtype_bytes
        + 2 * cfg.vocab_size * cfg.hidden_size * dtype_bytes
    )
    kv_bytes = 2 * cfg.num_layers * batch * keys * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    quantized_flops = 2 * batch * tokens * body.read_quantizable
    projection_flops = 2 * batch * tokens * body.per_position
    attention_flops = 4 * cfg.num_layers * batch * tokens * keys * cfg.num_heads * cfg.head_dim
    kept_flops = projection_flops - quantized_flops
    matmul_seconds = (
        quantized_flops / (MATMUL_RATE * (FP8_SPEEDUP if fp8 else 1.0)) + (kept_flops + attention_flops) / MATMUL_RATE
    )
    return max((weight_bytes + kv_bytes) / BANDWIDTH, matmul_seconds), projection_flops + attention_flops


def block_cycle(refresh: float, cached: float, steps_per_block: int) -> float:
    """A block's total of some per-step quantity (seconds, FLOPs): one refresh step, then cached steps."""
    return refresh + (steps_per_block - 1) * cached


def cycle_ceiling(batch: int, block: int, steps_per_block: int, floor_refresh: float, floor_cached: float) -> float:
    """Generated tokens/s if every step of a block cycle ran at its floor.

    The most any implementation of the schedule can reach on the GPU: a
    throughput target above it needs a cheaper schedule, not faster kernels.
    """
    return batch * block / block_cycle(floor_refresh, floor_cached, steps_per_block)


def sequence_length(cfg: ModelConfig, prompt_and_gen: int) -> int:
    """Positions a sequence takes: a block-causal canvas runs on to the end of its last block."""
    block = cfg.attention_block_size
    return prompt_and_gen if block is None else -(-prompt_and_gen // block) * block


def make_engine(
    arch: str,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    seq_len: int,
    tp: int = 1,
    cuda_graphs: bool = True,
    quantization: str = "none",
) -> LLMEngine:
    """An engine on a random `arch` model with room for `batch` sequences of `seq_len` (on `tp` GPUs: a 1/tp share
    of the KV each), its weights quantized as `quantization` says."""
    cfg = model_config(arch)
    seq_len = sequence_length(cfg, seq_len)
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize * batch * seq_len
    config = EngineConfig(model_dir="<random>", max_num_seqs=batch, max_num_batched_tokens=batch * seq_len,
                          kv_cache_memory=int(kv_bytes * 1.05 / tp) + 2**24, tensor_parallel_size=tp,
                          cuda_graph_max_tokens=EngineConfig.cuda_graph_max_tokens if cuda_graphs else 0,
                          device=device.type if tp > 1 else str(device), quantization=quantization)
    if tp == 1:
        return LLMEngine(config, loaded=build_model(arch, device, dtype, quantization))
    shards = RandomShards(cfg, tokenizer_dir=tempfile.mkdtemp(), dtype=str(dtype).removeprefix("torch."),
                          quantization=quantization)
    build_tokenizer(512, shards.tokenizer_dir)
    return LLMEngine(config, shards=shards)


def admit_random_requests(engine: LLMEngine, batch: int, prompt: int, params: SamplingParams, seed: int) -> None:
    """`batch` requests `r0`, `r1`, ... of `prompt` random token ids (never the mask token)."""
    cfg = engine.model_config
    generator = torch.Generator().manual_seed(seed)
    for i in range(batch):
        ids = torch.randint(2, cfg.vocab_size - 2, (prompt,), generator=generator).tolist()
        engine.add_request(f"r{i}", [t if t != cfg.mask_token_id else 2 for t in ids], params)


@dataclass(frozen=True)
class StepShapes:
    """Positions computed and keys attended per sequence by a cache's refresh and cached steps."""

    refresh_tokens: int
    refresh_keys: int
    cached_tokens: int
    cached_keys: int


def step_shapes(cfg: ModelConfig, cache: str, prompt: int, gen: int, block: int) -> StepShapes:
    seq_len = sequence_length(cfg, prompt + gen)
    if cache in ("block", "block-dual"):
        keys = prompt + 2 * block  # the measured cycle is the canvas's second block
        first = block if cfg.logits_shift else 2 * block  # Fast-dLLM v2's block entry recomputes the previous block alone
        return StepShapes(first, keys, block, keys)
    cached = {"none": seq_len, "prefix": gen, "dual": block}[cache]  # the first block's cached step
    return StepShapes(seq_len, seq_len, cached, seq_len)


def run_config(engine: LLMEngine, batch: int, prompt: int, tps: int, cache: str, gen: int, block: int) -> Row:
    cfg, tp = engine.model_config, engine.config.tensor_parallel_size
    times: list[tuple[int, float]] = []  # (active tokens, seconds)
    listener = lambda s: times.append((s.active_tokens, s.step_seconds))  # noqa: E731
    engine.step_listeners.append(listener)
    params = SamplingParams(max_tokens=gen, block_length=block, steps=block // tps, cache=cache)
    admit_random_requests(engine, batch, prompt, params, seed=batch * 1000 + prompt)
    steps_per_block = block // tps
    # one warm-up step, then one whole block cycle (none: a few steps are enough, all alike)
    n_steps = 1 + (3 if cache == "none" else steps_per_block + 1)
    for _ in range(n_steps):
        engine.step()
    for i in range(batch):
        engine.abort(f"r{i}")
    engine.step_listeners.remove(listener)
    shapes = step_shapes(cfg, cache, prompt, gen, block)
    measured = times[1:]
    full = [t for a, t in measured if a == batch * shapes.refresh_tokens]
    partial = [t for a, t in measured if a != batch * shapes.refresh_tokens]
    refresh = statistics.median(full)
    cached = statistics.median(partial) if partial else refresh
    cycle = block_cycle(refresh, cached, steps_per_block)
    dtype_bytes = torch.empty((), dtype=engine.loaded.dtype).element_size()
    quantization = engine.config.quantization
    floor_refresh, flops_refresh = step_floor(
        cfg, batch, shapes.refresh_tokens, shapes.refresh_keys, dtype_bytes, quantization
    )
    floor_cached, flops_cached = step_floor(cfg, batch, shapes.cached_tokens, shapes.cached_keys, dtype_bytes, quantization)
    flops_cycle = block_cycle(flops_refresh, flops_cached, steps_per_block)
    ceiling = cycle_ceiling(batch, block, steps_per_block, floor_refresh / tp, floor_cached / tp)
    return Row(batch, prompt, tps, cache, refresh * 1e3, cached * 1e3, batch * block / cycle,
               floor_refresh / tp * 1e3, floor_cached / tp * 1e3, ceiling, flops_cycle / cycle / (MATMUL_RATE * tp))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=list(PRESETS), default="llada-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 4])
    p.add_argument("--cache", nargs="+", default=None,
                   help="default: none, prefix, dual; none, block for a block-causal preset")
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=None, help="default 32; a block-causal preset's own block size")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="split the model over this many GPUs")
    p.add_argument("--quantization", nargs="+", choices=QUANTIZATIONS, default=["none"],
                   help="weight quantizations to measure, one engine after the other (several: their ratios too)")
    a = p.parse_args()
    block_causal = model_config(a.arch).attention_block_size
    a.cache = a.cache or (["none", "block"] if block_causal else ["none", "prefix", "dual"])
    a.block = a.block or block_causal or 32
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tables: dict[str, list[Row]] = {}
    for quantization in dict.fromkeys(a.quantization):
        engine = make_engine(a.arch, device, dtype, max(a.batch), max(a.prompt) + a.gen, a.tensor_parallel_size,
                             quantization=quantization)
        try:
            tables[quantization] = run_all(engine, a, device, dtype)
        finally:
            engine.close()
            del engine
            gc.collect()  # the next engine needs this one's weights, KV pool and graphs gone
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for line in ratio_lines(tables):
        print(line)


def run_all(engine: LLMEngine, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    warm_cache = "block" if engine.model_config.block_causal else "dual"
    run_config(engine, 1, 16, 1, warm_cache, 64, a.block)  # compile kernels and warm caches once
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if a.tensor_parallel_size > 1:
        where = f"{a.tensor_parallel_size} x {where} (tensor parallel)"
    print(f"# {a.arch} on {where}, gen {a.gen}, block {a.block}, {dtype}, quantization {engine.config.quantization}")
    header = ("batch", "prompt", "tok/step", "cache", "refresh ms", "cached ms", "gen tok/s", "floor tok/s",
              "floor refresh ms", "floor cached ms", "x floor (cached)", "MFU", "speedup vs none")
    print(" | ".join(header))
    baseline: dict[tuple, float] = {}
    rows: list[Row] = []
    for batch, prompt, tps, cache in itertools.product(a.batch, a.prompt, a.tokens_per_step, a.cache):
        try:
            r = run_config(engine, batch, prompt, tps, cache, a.gen, a.block)
        except torch.OutOfMemoryError:
            print(f"{batch} | {prompt} | {tps} | {cache} | out of memory")
            torch.cuda.empty_cache()
            continue
        rows.append(r)
        key = (batch, prompt, tps)
        baseline.setdefault(key, r.tokens_per_s if cache == "none" else float("nan"))
        speedup = r.tokens_per_s / baseline[key]
        print(f"{r.batch} | {r.prompt} | {r.tokens_per_step} | {r.cache} | {r.refresh_ms:.2f} | {r.cached_ms:.2f} | "
              f"{r.tokens_per_s:.0f} | {r.ceiling_tokens_per_s:.0f} | {r.floor_refresh_ms:.2f} | {r.floor_cached_ms:.2f} | "
              f"{r.cached_ms / r.floor_cached_ms:.2f} | {r.mfu:.1%} | {speedup:.2f}x", flush=True)
    return rows


def ratio_lines(tables: dict[str, list[Row]]) -> list[str]:
    """Each later quantization's step times and tokens/s over the first one's, configuration by configuration.

    Empty for a single quantization. A configuration measured in only one table is left out.
    """
    names = list(tables)
    if len(names) < 2:
        return []
    base_name = names[0]
    base = {(r.batch, r.prompt, r.tokens_per_step, r.cache): r for r in tables[base_name]}
    lines = []
    for name in names[1:]:
        lines.append(f"# {name} / {base_name}")
        lines.append("batch | prompt | tok/step | cache | refresh ms ratio | cached ms ratio | gen tok/s ratio")
        for r in tables[name]:
            b = base.get((r.batch, r.prompt, r.tokens_per_step, r.cache))
            if b is not None:
                lines.append(f"{r.batch} | {r.prompt} | {r.tokens_per_step} | {r.cache} | {r.refresh_ms / b.refresh_ms:.2f}x | "
                             f"{r.cached_ms / b.cached_ms:.2f}x | {r.tokens_per_s / b.tokens_per_s:.2f}x")
    return lines


if __name__ == "__main__":
    main()

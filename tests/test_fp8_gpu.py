"""FP8 weights on an Ada/Hopper GPU: the FP8 products against bf16 and the reference, and the engine with quantization="fp8".

Skipped without CUDA or on a GPU of compute capability below 8.9. Tolerances:
- the Triton quantization against the reference: the same scales (to float32
  rounding) and e4m3 values at most one e4m3 step apart (a quotient rounded the
  other way), at least 99.9% of them identical;
- `torch._scaled_mm` against the reference arithmetic on the same quantized
  operands in float32: relative error (Frobenius) below 1% (its bf16 output
  rounds at 2^-9, fast accumulation adds a little);
- FP8 against the bf16 product: below 6% (both operands rounded to e4m3, each
  element within 2^-4; the CPU reference measures 3.6%).
"""

from __future__ import annotations

import gc
import io
import json
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

from benchmarks.accuracy import main as accuracy_main
from benchmarks.throughput import make_engine, run_config
from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.llm import LLM
from unmask.engine.models.arch import CheckpointError
from unmask.engine.models.fp8 import Fp8Linear
from unmask.engine.models.loader import load_model
from unmask.engine.models.make_random import main as make_random
from unmask.engine.params import SamplingParams
from unmask.engine.runner import SequenceWork
from unmask.kernels._triton import HAS_TRITON
from unmask.kernels.fp8_linear import fp8_linear_reference, fp8_linear_scaled_mm
from unmask.kernels.fp8_quant import quantize_rows_reference, quantize_rows_triton


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU of compute capability 8.9+")]

KV = 64 * 2**20
SORT = [{"role": "user", "content": "Sort these numbers from smallest to largest: 42, 7, 19"}]
README_PARAMS = SamplingParams(max_tokens=64, block_length=32, cache="dual", unmask="threshold", threshold=0.9)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _random_layer(n: int, k: int, dtype: torch.dtype, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None, Fp8Linear]:
    """A float weight (channels of varied magnitude), its bias, and its FP8 layer, all on the GPU."""
    generator = torch.Generator("cuda").manual_seed(n + k)
    weight = (torch.randn(n, k, device="cuda", generator=generator) * torch.rand(n, 1, device="cuda", generator=generator))
    weight = weight.to(dtype)
    b = torch.randn(n, device="cuda", generator=generator).to(dtype) if bias else None
    return weight, b, Fp8Linear.quantize(weight, b)


# --- the kernels ------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("rows, cols", [(1, 4096), (33, 4096), (7, 14336), (5, 384)])
def test_triton_quantization_gives_the_references_scales_and_values(rows, cols):
    x = torch.randn(rows, cols, device="cuda") * torch.logspace(-2, 2, rows, device="cuda")[:, None]
    x = x.to(torch.bfloat16)
    x[0] = 0  # an all-zero row (padding) must quantize to zeros with a finite scale
    q, scale = quantize_rows_triton(x)
    q_ref, scale_ref = quantize_rows_reference(x)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0, msg="per-row scales differ from the reference")
    got, want = q.float(), q_ref.float()
    one_step = 2.0**-3 * want.abs() + 2.0**-9
    assert ((got - want).abs() <= one_step).all(), "an e4m3 value is more than one step from the reference's"
    same = (got == want).float().mean().item()
    assert same >= 0.999, f"only {same:.4%} of the e4m3 values equal the reference's"


@pytest.mark.parametrize("tokens", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_scaled_mm_product_is_the_reference_arithmetic(tokens, bias):
    _, b, layer = _random_layer(768, 512, torch.bfloat16, bias)
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    out = fp8_linear_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias)
    ref = fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias)
    assert out.shape == (tokens, 768) and out.dtype == torch.bfloat16
    err = _rel_err(out, ref)
    assert err < 0.01, f"torch._scaled_mm is {err:.4f} (relative) from the float32 reference of the same arithmetic"


@pytest.mark.parametrize("tokens", [1, 32, 2048])
def test_fp8_layer_is_the_bf16_linear_within_fp8_error(tokens):
    weight, b, layer = _random_layer(1024, 4096, torch.bfloat16, bias=True)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    err = _rel_err(layer(x), F.linear(x, weight, b))
    assert err < 0.06, f"the FP8 layer is {err:.4f} (relative) from the bf16 product; e4m3 rounding allows 0.06"


def test_an_fp16_model_gets_fp16_outputs_and_its_bias():
    weight, b, layer = _random_layer(256, 512, torch.float16, bias=True)
    assert layer.bias.dtype == torch.bfloat16  # the FP8 GEMM's epilogue adds a bf16 bias to its bf16 output
    x = torch.randn(16, 512, device="cuda", dtype=torch.float16)
    out = layer(x)
    assert out.dtype == torch.float16
    err = _rel_err(out, fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias))
    assert err < 0.01, f"fp16 input: {err:.4f} (relative) from the reference"


# --- the engine ---------------------------------------------------------------------------------------


def test_the_bundled_model_sorts_the_readme_prompt_as_in_bf16(bundled_model_dir):
    bf16 = LLM(str(bundled_model_dir), device="cuda", kv_cache_memory=KV).chat(SORT, README_PARAMS)
    _free_gpu()
    fp8 = LLM(str(bundled_model_dir), device="cuda", kv_cache_memory=KV, quantization="fp8").chat(SORT, README_PARAMS)
    assert fp8.text == bf16.text, f"fp8 answered {fp8.text!r}, bf16 {bf16.text!r}"
    assert "7, 19, 42" in fp8.text, f"fp8 answered {fp8.text!r}"


def test_an_fp8_engine_replays_cuda_graphs_like_its_eager_forward(bundled_model_dir):
    engine = LLMEngine(EngineConfig(model_dir=str(bundled_model_dir), device="cuda", kv_cache_memory=KV, quantization="fp8"))
    assert isinstance(engine.loaded.model.layers[0].mlp.down_proj, Fp8Linear), "the engine's model is not quantized"
    assert engine.runner.graphs is not None, "no CUDA graph runner on the FP8 engine"
    prompts = ["What is 12 plus 30?", "Hello world, how are you", "Sort: apple, banana, cherry, date"]
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24 + 8 * i, block_length=8)) for i, p in enumerate(prompts)]
    engine.scheduler.admit()
    work = [SequenceWork(s, torch.arange(s.length), s.masked_in_block()) for s in seqs]
    graphed = engine.runner.run(work).float()
    assert engine.runner.graphs.num_graphs == 1, "the FP8 step was not captured in a CUDA graph"
    engine.runner.graphs = None
    eager = engine.runner.run(work).float()
    torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2, msg="graph replay differs from the eager FP8 forward")


def test_fp8_weights_take_one_byte_per_projection_weight(tmp_path):
    """The bf16 weights are freed: loading in FP8 allocates one byte per projection weight less than bf16."""
    layers, hidden, ffn = 2, 2048, 8192
    make_random([str(tmp_path), "--layers", str(layers), "--hidden", str(hidden), "--heads", "16",
                 "--intermediate", str(ffn), "--vocab", "512", "--config-only"])
    projection_weights = layers * (4 * hidden * hidden + 3 * hidden * ffn)

    def allocated(quantization: str) -> int:
        _free_gpu()
        before = torch.cuda.memory_allocated()
        loaded = load_model(tmp_path, "bfloat16", "cuda", "dummy", quantization)
        used = torch.cuda.memory_allocated() - before
        del loaded
        return used

    bf16, fp8 = allocated("none"), allocated("fp8")
    saved = bf16 - fp8
    # the scales (4 bytes per output channel) take back a little of the byte saved per weight
    assert saved >= 0.99 * projection_weights, f"fp8 saves {saved} bytes over bf16; one per projection weight is {projection_weights}"


def test_fp8_refuses_a_float32_model(bundled_model_dir):
    with pytest.raises(CheckpointError, match="quantizes bfloat16 or float16 weights"):
        LLM(str(bundled_model_dir), device="cuda", dtype="float32", quantization="fp8")


# --- the benchmarks -----------------------------------------------------------------------------------


def test_the_accuracy_benchmark_runs_with_fp8_weights(bundled_model_dir, tmp_path):
    path = tmp_path / "rows.json"
    argv = ["--model", str(bundled_model_dir), "--n", "2", "--families", "count", "--configs", "dual/lc4",
            "--device", "cuda", "--kv-cache-mb", "64", "--no-warmup", "--quantization", "fp8", "--json", str(path)]
    printed = io.StringIO()
    with redirect_stdout(printed):
        rows = accuracy_main(argv)
    record = json.loads(path.read_text())
    assert [r.config for r in rows] == ["none/lc1", "dual/lc4"]
    assert record["quantization"] == "fp8" and "quantization fp8" in printed.getvalue().splitlines()[0]


def test_the_throughput_benchmark_measures_an_fp8_engine_against_its_fp8_floor():
    engine = make_engine("tiny", torch.device("cuda"), torch.bfloat16, batch=2, seq_len=16 + 64, quantization="fp8")
    assert isinstance(engine.loaded.model.layers[0].attn.o_proj, Fp8Linear), "the benchmark's model is not quantized"
    row = run_config(engine, 2, 16, 4, "dual", 64, 32)
    assert row.refresh_ms > 0 and row.cached_ms > 0 and row.tokens_per_s > 0
    assert engine.pool.num_free == engine.pool.num_pages


# --- tensor parallelism -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tp2_fp8_decodes_nearly_as_one_gpu_fp8(bundled_model_dir):
    """Each rank quantizes its own shard: o_proj/down_proj channels and the per-token scales of their inputs
    cover half the input features, so the numbers differ a little from one GPU's; 90% of tokens must agree."""
    prompts = ["What is 12 plus 30?", "Hello world, how are you", "The quick brown fox"]
    params = SamplingParams(max_tokens=32, block_length=32, cache="dual")
    one = LLM(str(bundled_model_dir), device="cuda", kv_cache_memory=KV, quantization="fp8").generate(prompts, params)
    _free_gpu()
    llm = LLM(str(bundled_model_dir), device="cuda", kv_cache_memory=KV, quantization="fp8", tensor_parallel_size=2)
    try:
        two = llm.generate(prompts, params)
    finally:
        llm.close()
    pairs = [(a, b) for x, y in zip(one, two) for a, b in zip(x.token_ids, y.token_ids)]
    same = sum(a == b for a, b in pairs)
    assert same >= 0.9 * len(pairs), f"{len(pairs) - same} of {len(pairs)} tokens differ between TP=2 and one GPU"

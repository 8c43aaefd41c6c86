"""FP8 weights (`quantization="fp8"`) on the CPU: the quantization arithmetic, the layer swap, and the refusals.

The FP8 products themselves run on Ada/Hopper GPUs (tests/test_fp8_gpu.py);
here the plain-PyTorch reference of the same arithmetic (e4m3 casts work on
the CPU) checks the scales, the round trip, a quantized model's forward and the
engine decoding with it.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.llm import LLM
from unmask.engine.models.arch import CheckpointError
from unmask.engine.models.checkpoint import load_weights, read_config
from unmask.engine.models.fp8 import Fp8Linear, Fp8Rows, check_fp8_shapes, quantize_fp8
from unmask.engine.models.loader import load_model
from unmask.engine.params import SamplingParams
from unmask.kernels.fp8_linear import fp8_linear_reference, fp8_linear_scaled_mm
from unmask.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, quantize_rows_reference
from unmask.server.cli import main

# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of it;
# below the smallest normal (2^-6 in units of the scale) the step is 2^-9, so at most 2^-10 off.
E4M3_RELATIVE = 2.0**-4
E4M3_SUBNORMAL_ABS = 2.0**-10


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_each_row_gets_its_own_scale_its_largest_magnitude_over_448():
    x = torch.randn(4, 64) * torch.tensor([[1e-3], [1.0], [50.0], [3e4]])
    q, scale = quantize_rows_reference(x)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (4, 1)
    torch.testing.assert_close(scale, x.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    # Each row's largest magnitude lands on e4m3's largest value: the row spans the whole range.
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((4,), FP8_MAX))


def test_round_trip_is_within_e4m3_rounding_of_every_element():
    x = torch.randn(64, 512, dtype=torch.bfloat16) * torch.logspace(-3, 3, 64)[:, None].to(torch.bfloat16)
    q, scale = quantize_rows_reference(x)
    xf = x.float()
    err = (q.float() * scale - xf).abs()
    bound = E4M3_RELATIVE * xf.abs() + E4M3_SUBNORMAL_ABS * scale
    worst = (err / bound).max().item()
    assert worst <= 1.0 + 1e-5, f"an element is {worst:.3f}x the e4m3 rounding bound away from its value"


def test_an_all_zero_row_quantizes_to_zeros_with_a_finite_scale():
    x = torch.zeros(2, 32)
    x[1, 3] = 5.0
    q, scale = quantize_rows_reference(x)
    assert torch.isfinite(scale).all() and scale[0].item() > 0
    assert torch.equal(q[0].float(), torch.zeros(32)) and q[1, 3].float().item() == FP8_MAX


def test_fp8_linear_reference_is_the_float_product_within_fp8_error():
    """Both operands rounded to e4m3 (each within 2^-4): measured 3.6% relative error; bound 6%."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=generator)
    weight = torch.randn(128, 256, generator=generator) * torch.rand(128, 1, generator=generator)  # channel scales vary
    bias = torch.randn(128, generator=generator)
    layer = Fp8Linear.quantize(weight, bias)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (1, 128)
    out = fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias)
    assert _rel_err(out, F.linear(x, weight, bias)) < 0.06


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_the_scaled_mm_call_is_the_reference_arithmetic(tokens):
    """torch's CPU `_scaled_mm` runs the GPU path's exact call (operands, row-wise scales, bf16 bias and output)."""
    generator = torch.Generator().manual_seed(tokens)
    weight = torch.randn(768, 512, generator=generator).to(torch.bfloat16)
    layer = Fp8Linear.quantize(weight, torch.randn(768, generator=generator).to(torch.bfloat16))
    x = torch.randn(tokens, 512, generator=generator).to(torch.bfloat16)
    out = fp8_linear_scaled_mm(x, layer.weight, layer.weight_scale, layer.bias)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, 768)
    assert _rel_err(out, fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.bias)) < 1e-3


def test_fused_layers_keep_one_scale_per_output_channel(llada_dir):
    model = load_weights(llada_dir, torch.float32, "cpu")
    attn = model.layers[0].attn
    weights = [p.weight.detach().clone() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    fused = Fp8Rows.quantize(attn.qkv)
    want = torch.cat([w.abs().amax(dim=1) for w in weights]) / FP8_MAX
    torch.testing.assert_close(fused.linear.weight_scale[0], want)


def test_quantize_fp8_swaps_every_projection_and_keeps_embedding_head_and_norms(llada_dir):
    model = load_weights(llada_dir, torch.float32, "cpu")
    quantize_fp8(model)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        layers = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        assert all(isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8_DTYPE for layer in layers)
        # The single layers are views of the fused weights: one copy of each weight.
        assert attn.v_proj.weight.untyped_storage().data_ptr() == attn.qkv.linear.weight.untyped_storage().data_ptr()
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up.linear.weight.untyped_storage().data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # embedding, head, norms
    assert not any(isinstance(m, torch.nn.Linear) for block in model.layers for m in block.modules())


def test_a_quantized_model_computes_nearly_the_float_logits(bundled_model_dir):
    """The bundled model on random tokens: measured 3.6% relative logit error and 94% equal argmaxes."""
    model = load_weights(bundled_model_dir, torch.float32, "cpu")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.forward_dense(ids)
        quantize_fp8(model)
        got = model.forward_dense(ids)
    assert _rel_err(got, want) < 0.08
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.85


def test_a_single_fused_layer_matches_its_rows_of_the_fused_product(model_dir):
    """dLLM-Cache calls v_proj alone: its view (and its bias, Dream's) must give the fused product's v columns."""
    model = load_weights(model_dir, torch.float32, "cpu")
    quantize_fp8(model)
    attn = model.layers[0].attn
    x = torch.randn(5, model.cfg.hidden_size)
    _, _, v = attn.qkv(x)
    torch.testing.assert_close(attn.v_proj(x), v)


def test_projections_not_16_wide_are_refused_naming_the_dimension(llada_dir):
    cfg = read_config(llada_dir)  # hidden 64, 4 heads, FFN 192: every width a multiple of 16
    check_fp8_shapes(cfg)
    with pytest.raises(CheckpointError, match="multiples of 16; hidden_size is 72"):
        check_fp8_shapes(replace(cfg, hidden_size=72))
    with pytest.raises(CheckpointError, match=r"the query heads' width per tensor-parallel rank \(8\) is 8"):
        check_fp8_shapes(cfg, tensor_parallel_size=8)


def test_a_layer_whose_weight_is_not_16_wide_is_refused():
    with pytest.raises(CheckpointError, match="multiples of 16"):
        Fp8Linear.quantize(torch.randn(24, 64), None)


@pytest.mark.parametrize("cache, unmask", [("dual", "threshold"), ("dllm-cache", "low_confidence"), ("none", "low_confidence")])
def test_the_engine_on_fp8_weights_sorts_the_readme_prompt(bundled_model_dir, cache, unmask):
    """The FP8 arithmetic (the reference's, on the CPU) through the real engine; dLLM-Cache calls v_proj alone."""
    loaded = load_model(bundled_model_dir, "float32", "cpu")
    quantize_fp8(loaded.model)
    config = EngineConfig(model_dir=str(bundled_model_dir), device="cpu", kv_cache_memory=64 * 2**20, feature_cache=True)
    engine = LLMEngine(config, loaded=loaded)
    messages = [{"role": "user", "content": "Sort these numbers from smallest to largest: 42, 7, 19"}]
    prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    params = SamplingParams(max_tokens=64, block_length=32, cache=cache, unmask=unmask, threshold=0.9)
    seq = engine.add_request("sort", prompt, params)
    while engine.has_unfinished:
        engine.step()
    text = engine.tokenizer.decode(seq.committed_prefix(), skip_special_tokens=True)
    assert text.strip() == "Answer: 7, 19, 42"


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of none, fp8"):
        EngineConfig(model_dir="x", quantization="int4")


def test_fp8_on_the_cpu_is_refused_at_startup(bundled_model_dir):
    with pytest.raises(CheckpointError, match="quantization fp8 needs a CUDA GPU of compute capability 8.9"):
        LLM(str(bundled_model_dir), device="cpu", quantization="fp8")


def test_fp8_with_tensor_parallelism_on_the_cpu_is_refused_before_any_worker_starts(llada_dir):
    with pytest.raises(CheckpointError, match="quantization fp8 needs a CUDA GPU"):
        LLM(str(llada_dir), device="cpu", tensor_parallel_size=2, quantization="fp8")
    assert multiprocessing.active_children() == []


def test_serve_with_fp8_on_the_cpu_exits_with_a_one_line_error(bundled_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(bundled_model_dir), "--device", "cpu", "--quantization", "fp8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert "quantization fp8 needs a CUDA GPU" in err[-1] and "the device is cpu" in err[-1]

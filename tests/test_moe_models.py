"""Mixture-of-experts families (LLaDA-MoE, LLaDA2, SDAR-MoE): the native forward and decoding against a dense reference,
their public checkpoint layouts and configs, and their presets.

The reference (`moe_reference.py`) is independent of the engine's model: it
runs every expert on every token and weights them by a dense routing matrix
built as the families' reference code routes. The random checkpoints are
scaled so that what a position predicts depends on its context and tokens
spread over the experts (both checked), so matching token for token means
something.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decoding_reference import dense_decode
from engine_checks import assert_cuda_decodes_like_the_cpu, assert_dummy_preset_generates, assert_whole_forward_matches
from moe_reference import MoEReference
from test_models import _tensor_names

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.llm import LLM
from unmask.engine.models import CheckpointError, load_model
from unmask.engine.models.checkpoint import INDEX_FILE, read_config
from unmask.engine.models.loader import read_dummy_config
from unmask.engine.models.make_random import main as make_random
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.engine.params import SamplingParams
from unmask.engine.policies import CACHE_POLICIES

FORWARD_TOLERANCE = 1e-4  # fp32 logits of two layers: the routed forward and the all-experts reference differ by rounding
FAMILIES = ("llada-moe", "llada2", "sdar-moe")

# The fields of inclusionAI/LLaDA2.0-mini's config.json that matter here.
LLADA2_MINI_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "hidden_size": 2048, "num_hidden_layers": 20,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 5120,
    "moe_intermediate_size": 512, "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1,
    "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "router_dtype": "fp32",
    "partial_rotary_factor": 0.5, "rope_theta": 600000, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "vocab_size": 157184, "pad_token_id": 156892, "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True,
    "tie_word_embeddings": False, "hidden_act": "silu",
}
# inclusionAI/LLaDA-MoE-7B-A1B-Instruct's: its model_type is `llada`, like LLaDA-8B's.
LLADA_MOE_7B_CONFIG = {
    "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 16, "dense_intermediate_size": 8192,
    "expert_intermediate_size": 1024, "shared_expert_intermediate_size": None, "num_experts": 64,
    "num_experts_per_tok": 8, "moe_layer_freq": [1] * 16, "moe_router_enable_expert_bias": False,
    "moe_router_score_function": "softmax", "qk_layernorm": True, "attention_bias": False, "clip_qkv": None,
    "rope_theta": 50000, "rope_scaling": None, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "vocab_size": 157184, "hidden_act": "silu", "tie_word_embeddings": False,
}

# JetLM/SDAR-30B-A3B-Chat's: Qwen3-30B-A3B's shapes and router fields (no block_size, no mask_token_id).
SDAR_30B_A3B_CONFIG = {
    "architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe", "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936, "rope_theta": 1000000, "rope_scaling": None,
    "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": False, "max_position_embeddings": 32768,
    "eos_token_id": 151643, "hidden_act": "silu",
}


@pytest.fixture(scope="module", params=FAMILIES)
def moe_dir(request, tmp_path_factory) -> Path:
    return make_random_checkpoint(
        tmp_path_factory.mktemp(request.param), arch=request.param, layers=2, hidden=64, heads=4, layer_std=0.2
    )


@pytest.fixture(scope="module")
def reference(moe_dir) -> MoEReference:
    return MoEReference(moe_dir)


def _engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model_dir), kv_cache_memory=8 * 2**20))


def _prompt(n: int, first: int = 10) -> list[int]:
    return [first, *range(40, 40 + n - 1)]


def test_random_moe_checkpoints_predict_from_context(reference):
    """Changing the first prompt token changes later predictions, so token-for-token tests can fail."""
    a, b = reference.logits(_prompt(40, first=10)), reference.logits(_prompt(40, first=11))
    assert (a[33:].argmax(-1) != b[33:].argmax(-1)).any()


def test_tokens_of_one_sequence_go_to_different_experts(reference):
    """The routed layer's router spreads a sequence over most experts (else the routing could be wrong unseen)."""
    x = reference.w.get("model.word_embeddings.weight", reference.w.get("model.embed_tokens.weight"))[40:80]
    used = (reference.routing_matrix(x, "model.layers.1") != 0).any(0)
    assert int(used.sum()) >= reference.hf["num_experts"] - 2


def test_native_packed_paged_forward_matches_the_all_experts_reference(moe_dir, reference):
    engine = _engine(moe_dir)
    seqs = [engine.add_request(f"r{n}", _prompt(n), SamplingParams(max_tokens=m)) for n, m in ((5, 16), (30, 21))]
    engine.scheduler.admit()
    assert_whole_forward_matches(engine, seqs, reference, FORWARD_TOLERANCE)


@pytest.mark.parametrize("rule", ["one_per_step", "threshold"])
def test_llada_moe_decodes_token_for_token_like_the_dense_reference(tmp_path_factory, rule):
    model_dir = make_random_checkpoint(tmp_path_factory.mktemp("llada-moe-decode"), arch="llada-moe", layers=2,
                                       hidden=64, heads=4, layer_std=0.2)
    prompt, canvas = _prompt(7), 24
    threshold = 0.3 if rule == "threshold" else None
    expected = dense_decode(MoEReference(model_dir).as_loaded(), prompt, [MoEReference(model_dir).mask_id] * canvas,
                            block_length=8, threshold=threshold)
    unmask = {"unmask": "threshold", "threshold": 0.3} if threshold else {"unmask": "low_confidence"}
    params = SamplingParams(max_tokens=canvas, block_length=8, cache="none", ignore_eos=True, **unmask)
    assert LLM(str(model_dir)).generate(prompt, params)[0].token_ids == expected.canvas


def test_llada_moe_under_the_dual_cache_decodes_like_the_reference_dual_cache(tmp_path):
    """Each block refreshed at its first step, then only the block recomputed over the refresh's K/V."""
    model_dir = make_random_checkpoint(tmp_path, arch="llada-moe", layers=2, hidden=64, heads=4, layer_std=0.2)
    prompt = _prompt(7)
    expected = MoEReference(model_dir).dual_decode(prompt, 24, block_length=8, threshold=0.3)
    params = SamplingParams(max_tokens=24, block_length=8, cache="dual", unmask="threshold", threshold=0.3, ignore_eos=True)
    assert LLM(str(model_dir)).generate(prompt, params)[0].token_ids == expected


@pytest.mark.parametrize("cache", ["block", "none"])
@pytest.mark.parametrize("prompt_len", [6, 30])  # the canvas inside the first block of 32, and across its edge
@pytest.mark.parametrize("rule", ["one_per_step", "threshold"])
def test_llada2_decodes_token_for_token_like_the_dense_reference(tmp_path_factory, cache, prompt_len, rule):
    model_dir = _llada2_dir(tmp_path_factory)
    prompt = _prompt(prompt_len)
    expected = MoEReference(model_dir).reference_decode(prompt, 12, rule, threshold=0.3)
    unmask = {"one_per_step": {"unmask": "low_confidence"}, "threshold": {"unmask": "threshold", "threshold": 0.3}}[rule]
    out = LLM(str(model_dir)).generate(prompt, SamplingParams(max_tokens=12, cache=cache, ignore_eos=True, **unmask))[0]
    assert out.token_ids == expected


@pytest.mark.parametrize("cache", ["block", "none"])
@pytest.mark.parametrize("rule", ["one_per_step", "threshold"])
def test_sdar_moe_decodes_token_for_token_like_the_dense_reference(tmp_path_factory, cache, rule):
    model_dir = tmp_path_factory.getbasetemp() / "sdar-moe-decode"
    if not (model_dir / "config.json").is_file():
        make_random_checkpoint(model_dir, arch="sdar-moe", layers=2, hidden=64, heads=4, layer_std=0.2)
    prompt = _prompt(6)
    expected = MoEReference(model_dir).reference_decode(prompt, 14, rule, threshold=0.3)
    unmask = {"one_per_step": {"unmask": "low_confidence"}, "threshold": {"unmask": "threshold", "threshold": 0.3}}[rule]
    out = LLM(str(model_dir)).generate(prompt, SamplingParams(max_tokens=14, cache=cache, ignore_eos=True, **unmask))[0]
    assert out.token_ids == expected


def _llada2_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "llada2-decode"
    if not (root / "config.json").is_file():
        make_random_checkpoint(root, arch="llada2", layers=2, hidden=64, heads=4, layer_std=0.2)
    return root


@pytest.mark.parametrize("cache", [name for name, policy in CACHE_POLICIES.items() if not policy.block_causal_only])
def test_every_full_attention_cache_serves_llada_moe_and_frees_its_pages(tmp_path, cache):
    model_dir = make_random_checkpoint(tmp_path, arch="llada-moe", layers=1, hidden=64, heads=4)
    llm = LLM(str(model_dir), kv_cache_memory=8 * 2**20, feature_cache=True)  # the pages dllm-cache keeps
    out = llm.generate([_prompt(9), _prompt(5)], SamplingParams(max_tokens=16, block_length=8, cache=cache, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [16, 16]
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


def test_llada2_checkpoint_fuses_qkv_and_names_experts_as_the_public_release(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="llada2", layers=2, hidden=64, heads=4, max_shard_bytes=2**16)
    names = _tensor_names(model_dir)
    layer = "model.layers.1"
    assert {"model.word_embeddings.weight", f"{layer}.attention.query_key_value.weight", f"{layer}.attention.dense.weight",
            f"{layer}.attention.query_layernorm.weight", f"{layer}.mlp.gate.weight", f"{layer}.mlp.gate.expert_bias",
            f"{layer}.mlp.experts.7.down_proj.weight", f"{layer}.mlp.shared_experts.up_proj.weight",
            "model.layers.0.mlp.gate_proj.weight"} <= names
    assert not any("q_proj" in n or "model.layers.0.mlp.experts" in n for n in names)
    assert (model_dir / INDEX_FILE).is_file()  # sharded, as the public release is
    cfg = load_model(model_dir).config
    assert (cfg.rotary_dim, cfg.head_dim, cfg.attention_block_size) == (8, 16, 32)


def test_llada2_reads_q_k_and_v_as_rows_of_the_fused_tensor(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="llada2", layers=1, hidden=64, heads=4)
    attn = load_model(model_dir).model.layers[0].attn
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        fused = f.get_tensor("model.layers.0.attention.query_key_value.weight")
    q, kv = 4 * 16, 2 * 16
    torch.testing.assert_close(attn.k_proj.weight, fused[q : q + kv], rtol=0, atol=0)
    torch.testing.assert_close(attn.v_proj.weight, fused[q + kv :], rtol=0, atol=0)


def test_llada_moe_checkpoint_has_per_expert_names_and_the_shared_expert_at_the_layer(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="llada-moe", layers=1, hidden=64, heads=4)
    hf = json.loads((model_dir / "config.json").read_text())
    hf |= {"shared_expert_intermediate_size": 16, "moe_router_enable_expert_bias": True}
    (model_dir / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="shared_expert.gate_proj|expert_bias"):
        load_model(model_dir)  # the config now asks for tensors under their public names, which are absent
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.experts.7.gate_proj.weight",
            "model.layers.0.mlp.gate.weight"} <= _tensor_names(model_dir)


def test_sdar_moe_checkpoint_has_qwen3_moe_names(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="sdar-moe", layers=1, hidden=64, heads=4)
    names = _tensor_names(model_dir)
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.experts.7.down_proj.weight", "model.embed_tokens.weight"} <= names
    assert "model.layers.0.mlp.gate_proj.weight" not in names


def _config_dir(tmp_path, hf: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def test_public_llada2_mini_config_takes_its_router_blocks_and_rotary(tmp_path):
    cfg = read_config(_config_dir(tmp_path, LLADA2_MINI_CONFIG))
    moe = cfg.moe
    assert (cfg.arch, cfg.attention_block_size, cfg.rotary_dim, cfg.mask_token_id, cfg.eos_token_id) == ("llada2", 32, 64, 156895, 156892)
    assert (moe.num_experts, moe.top_k, moe.num_groups, moe.top_groups, moe.routed_scaling_factor) == (256, 8, 8, 4, 2.5)
    assert (moe.scoring, moe.expert_bias, moe.normalize, moe.router_float32) == ("sigmoid", "selection", True, True)
    assert (moe.shared_intermediate_size, moe.dense_layers, cfg.intermediate_size) == (512, (0,), 5120)


def test_public_llada_moe_config_is_told_from_llada_8b_by_its_experts(tmp_path):
    cfg = read_config(_config_dir(tmp_path, LLADA_MOE_7B_CONFIG))
    assert (cfg.arch, cfg.block_causal, cfg.qk_norm, cfg.mask_token_id, cfg.intermediate_size) == ("llada-moe", False, True, 156895, 8192)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.scoring, cfg.moe.normalize, cfg.moe.dense_layers) == (64, 8, "softmax", False, ())


def test_public_sdar_moe_config_routes_every_layer_with_renormalised_softmax(tmp_path):
    cfg = read_config(_config_dir(tmp_path, SDAR_30B_A3B_CONFIG))
    assert (cfg.arch, cfg.attention_block_size, cfg.mask_token_id, cfg.head_dim, cfg.num_kv_heads) == ("sdar-moe", 4, 151669, 128, 4)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_intermediate_size) == (128, 8, 768)
    assert (cfg.moe.scoring, cfg.moe.normalize, cfg.moe.dense_layers, cfg.moe.router_float32) == ("softmax", True, (), False)


def test_sdar_moe_mlp_only_layers_stay_dense(tmp_path):
    cfg = read_config(_config_dir(tmp_path, SDAR_30B_A3B_CONFIG | {"mlp_only_layers": [0, 5]}))
    assert cfg.moe.dense_layers == (0, 5) and not cfg.is_moe_layer(5) and cfg.is_moe_layer(1)


@pytest.mark.parametrize("hf,field", [(LLADA2_MINI_CONFIG, "use_bias"), (LLADA_MOE_7B_CONFIG, "clip_qkv")])
def test_unsupported_moe_config_fields_are_refused_naming_them(tmp_path, hf, field):
    with pytest.raises(CheckpointError, match=field):
        read_config(_config_dir(tmp_path, hf | {field: True if field == "use_bias" else 8.0}))


@pytest.mark.parametrize(
    "preset,shape",
    [("llada-moe-7b", (2048, 16, 16, 64, 8, 1024, None)), ("llada2-mini", (2048, 20, 16, 256, 8, 512, 32)),
     ("sdar-30b-a3b", (2048, 48, 32, 128, 8, 768, 4))],
)
def test_moe_presets_write_the_real_shapes_for_dummy_loading(tmp_path, preset, shape):
    make_random([str(tmp_path), "--preset", preset, "--config-only"])
    cfg = read_dummy_config(tmp_path)
    got = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.moe.num_experts, cfg.moe.top_k,
           cfg.moe.expert_intermediate_size, cfg.attention_block_size)
    assert got == shape


@pytest.mark.parametrize("preset", ["llada-moe-7b", "llada2-mini", "sdar-30b-a3b"])
def test_a_scaled_down_dummy_moe_directory_generates(tmp_path, preset):
    make_random([str(tmp_path), "--preset", preset, "--config-only", "--layers", "2", "--hidden", "128", "--heads", "4"])
    llm = LLM(str(tmp_path), load_format="dummy", kv_cache_memory=32 * 2**20)
    out = llm.generate("Hello", SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(out.token_ids) == 10


def test_llada2_commits_by_its_references_threshold_rule_of_0_95_by_default(tmp_path_factory):
    engine = _engine(_llada2_dir(tmp_path_factory))
    seq = engine.make_sequence("r", _prompt(5), SamplingParams(max_tokens=8))
    params = seq.params
    assert (params.unmask, params.threshold, params.cache, params.block_length) == ("joint_threshold", 0.95, "block", 32)
    assert not seq.editing  # LLaDA2.0's rule: editing only when a request asks for it


def test_a_request_choosing_its_unmask_policy_overrides_llada2s_default(tmp_path_factory):
    engine = _engine(_llada2_dir(tmp_path_factory))
    seq = engine.make_sequence("r", _prompt(5), SamplingParams(max_tokens=8, unmask="low_confidence"))
    assert seq.params.unmask == "low_confidence"


@pytest.mark.gpu
def test_cuda_moe_decoding_matches_the_cpu_engine(moe_dir):
    """`kernels.moe.moe_experts` on CUDA (Triton), the block-causal or full attention kernels and CUDA graphs,
    in fp32, against the CPU engine's PyTorch references."""
    params = SamplingParams(max_tokens=21, unmask="threshold", threshold=0.3, ignore_eos=True)
    assert_cuda_decodes_like_the_cpu(moe_dir, [_prompt(6), _prompt(30), _prompt(9, first=11)], params)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["llada-moe-7b", "llada2-mini"])
def test_dummy_moe_models_of_the_real_shapes_generate_on_the_gpu(tmp_path, preset):
    assert_dummy_preset_generates(tmp_path, preset, SamplingParams(max_tokens=64, ignore_eos=True))

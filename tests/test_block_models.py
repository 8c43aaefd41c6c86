"""Block-causal checkpoint layouts: SDAR (Qwen3) and Fast-dLLM v2 (Qwen2.5) load as their public releases are written."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_models import _tensor_names

from unmask.engine.llm import LLM

from unmask.engine.models import CheckpointError, load_model
from unmask.engine.models.checkpoint import read_config
from unmask.engine.models.loader import read_dummy_config
from unmask.engine.models.make_random import PRESETS, make_random_checkpoint, resize, write_random_checkpoint
from unmask.engine.models.make_random import main as make_random
from unmask.engine.params import SamplingParams

# The fields of JetLM/SDAR-8B-Chat's config.json that matter here (no block_size, no mask_token_id).
SDAR_8B_CONFIG = {
    "architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 4096, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
    "vocab_size": 151936, "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-6, "attention_bias": False,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "eos_token_id": 151643, "hidden_act": "silu",
}
# Efficient-Large-Model/Fast_dLLM_v2_7B's (Qwen2.5-7B-Instruct's shapes, the block size as bd_size).
FASTDLLM_V2_7B_CONFIG = {
    "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "hidden_size": 3584,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
    "vocab_size": 152064, "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "bd_size": 32,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "eos_token_id": 151645, "hidden_act": "silu",
}


def _config_dir(tmp_path, hf: dict):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def test_sdar_checkpoint_has_qwen3_names_with_per_head_qk_norms_and_no_biases(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="sdar", layers=1, hidden=64, heads=4)
    names = _tensor_names(model_dir)
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight", "lm_head.weight"} <= names
    assert not any(name.endswith("proj.bias") for name in names)
    hf = json.loads((model_dir / "config.json").read_text())
    assert (hf["model_type"], hf["head_dim"], hf["block_size"]) == ("sdar", 32, 4)


def test_fastdllm_v2_checkpoint_has_qwen2_names_with_qkv_biases(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="fastdllm-v2", layers=1, hidden=64, heads=4)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= _tensor_names(model_dir)
    assert not any("q_norm" in name for name in _tensor_names(model_dir))
    loaded = load_model(model_dir)
    assert loaded.config.logits_shift == 1 and loaded.config.attention_block_size == 8 and loaded.config.sub_block_size == 4


def test_tied_sdar_checkpoint_has_no_lm_head_and_reads_logits_from_the_embedding(tmp_path):
    cfg = resize(PRESETS["sdar-1.7b"], layers=1, hidden=64, heads=4, vocab=512)
    model_dir = write_random_checkpoint(tmp_path, replace(cfg, max_position=256))
    assert "lm_head.weight" not in _tensor_names(model_dir)
    model = load_model(model_dir).model
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_public_sdar_config_takes_the_released_block_size_and_mask_token(tmp_path):
    cfg = read_config(_config_dir(tmp_path, SDAR_8B_CONFIG))
    assert (cfg.attention_block_size, cfg.mask_token_id, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias) == (4, 151669, 128, True, False)
    assert cfg.logits_shift == 0 and cfg.num_kv_heads == 8 and not cfg.tie_word_embeddings


def test_public_fastdllm_v2_config_takes_its_blocks_sub_blocks_and_mask_token(tmp_path):
    cfg = read_config(_config_dir(tmp_path, FASTDLLM_V2_7B_CONFIG))
    assert (cfg.attention_block_size, cfg.sub_block_size, cfg.mask_token_id, cfg.eos_token_id) == (32, 8, 151665, 151645)
    assert cfg.qkv_bias and cfg.logits_shift == 1 and cfg.head_dim == 128


def test_a_block_size_in_the_config_overrides_sdars_default(tmp_path):
    cfg = read_config(_config_dir(tmp_path, SDAR_8B_CONFIG | {"block_size": 32, "eos_token_id": [151645, 151643]}))
    assert cfg.attention_block_size == 32 and cfg.eos_token_id == 151645


@pytest.mark.parametrize("hf", [SDAR_8B_CONFIG, FASTDLLM_V2_7B_CONFIG], ids=["sdar", "fastdllm-v2"])
def test_scaled_rope_is_refused_rather_than_served_wrong(tmp_path, hf):
    with pytest.raises(CheckpointError, match="rope_scaling"):
        read_config(_config_dir(tmp_path, hf | {"rope_scaling": {"type": "yarn", "factor": 4.0}}))


@pytest.mark.parametrize(
    "preset,shape",
    [
        ("sdar-8b", (4096, 36, 32, 8, 128, 4, None, False)),
        ("sdar-1.7b", (2048, 28, 16, 8, 128, 4, None, True)),
        ("fastdllm-v2-7b", (3584, 28, 28, 4, 128, 32, 8, False)),
        ("fastdllm-v2-1.5b", (1536, 28, 12, 2, 128, 32, 8, True)),
    ],
)
def test_block_diffusion_presets_write_the_real_shapes_for_dummy_loading(tmp_path, preset, shape):
    make_random([str(tmp_path), "--preset", preset, "--config-only"])
    cfg = read_dummy_config(tmp_path)
    got = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
           cfg.attention_block_size, cfg.sub_block_size, cfg.tie_word_embeddings)
    assert got == shape


def test_a_dummy_sdar_directory_serves_blocks_of_its_size(tmp_path):
    make_random([str(tmp_path), "--preset", "sdar-8b", "--config-only", "--layers", "1", "--hidden", "128", "--heads", "4"])
    llm = LLM(str(tmp_path), load_format="dummy", kv_cache_memory=32 * 2**20)
    out = llm.generate("Hello", SamplingParams(max_tokens=10, ignore_eos=True))[0]
    p = len(out.prompt_token_ids)
    assert len(out.token_ids) == 10
    assert len(out.stats.steps_per_block) == -(-(p + 10) // 4) - p // 4  # blocks of 4 from position 0

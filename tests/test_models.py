"""The checkpoint loader: both public layouts, sharding, dtypes, random (dummy) weights, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from unmask.engine.config import EngineConfig
from unmask.engine.models import CheckpointError, load_model
from unmask.engine.models.checkpoint import INDEX_FILE, load_weights, read_config, save_checkpoint
from unmask.engine.models.loader import load_tokenizer
from unmask.engine.models.make_random import main as make_random
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.engine.models.transformer import DiffusionTransformer

LLADA_NAMES = [
    "model.transformer.wte.weight",
    "model.transformer.ln_f.weight",
    "model.transformer.ff_out.weight",
    *[f"model.transformer.blocks.0.{n}.weight" for n in
      ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")],
]
DREAM_NAMES = [
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight", "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
]


def _tensor_names(model_dir) -> set[str]:
    names = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names


def test_llada_checkpoint_uses_the_public_tensor_names_and_config_fields(llada_dir):
    assert set(LLADA_NAMES) <= _tensor_names(llada_dir)
    hf = json.loads((llada_dir / "config.json").read_text())
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                  "embedding_size", "rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id", "weight_tying"):
        assert field in hf
    assert hf["model_type"] == "llada"


def test_dream_checkpoint_uses_the_qwen2_tensor_names(dream_dir):
    assert set(DREAM_NAMES) <= _tensor_names(dream_dir)
    loaded = load_model(dream_dir)
    assert loaded.config.logits_shift == 1 and loaded.config.qkv_bias


def test_round_trip_preserves_config_and_outputs(tmp_path, model_dir):
    first = load_model(model_dir)
    save_checkpoint(first.model, tmp_path, dtype=torch.float32)
    assert read_config(tmp_path) == first.config
    model = load_weights(tmp_path, torch.float32, "cpu")
    ids = torch.tensor([[3, 7, 11, 5, 9]])
    torch.testing.assert_close(model.forward_dense(ids), first.model.forward_dense(ids), rtol=0, atol=0)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, llada_dir):
    sharded = make_random_checkpoint(tmp_path, arch="llada", layers=2, hidden=64, heads=4, max_shard_bytes=100_000)
    assert (sharded / INDEX_FILE).is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = torch.tensor([[3, 7, 11, 5]])
    a, b = load_model(sharded).model, load_model(llada_dir).model
    torch.testing.assert_close(a.forward_dense(ids), b.forward_dense(ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    out = make_random_checkpoint(tmp_path, arch="llada", dtype=getattr(torch, dtype))
    loaded = load_model(out, dtype=dtype)
    assert loaded.model.embed.weight.dtype == getattr(torch, dtype)
    assert loaded.model.forward_dense(torch.tensor([[1, 2, 3]])).isfinite().all()


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_unknown_model_type_is_a_clear_error(tmp_path, llada_dir):
    for f in llada_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf | {"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'"):
        load_model(tmp_path)


def test_missing_tensor_is_named_in_the_error(tmp_path, llada_dir):
    from safetensors.torch import load_file, save_file

    for f in llada_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="blocks.1.up_proj.weight"):
        load_model(tmp_path)


def test_make_random_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, "-m", "unmask.engine.models.make_random", str(out), "--arch", "dream",
         "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "300"],
        check=True, capture_output=True,
    )
    loaded = load_model(out)
    assert loaded.config.num_layers == 1 and loaded.config.num_kv_heads == 1
    text = "What is 12 plus 30?"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    assert loaded.tokenizer.mask_token_id == loaded.config.mask_token_id


# --- config-only directories and load_format="dummy" ---------------------------------------------------


def test_llada_8b_preset_config_only_writes_its_shapes_and_a_tokenizer_covering_its_vocabulary(tmp_path):
    make_random([str(tmp_path), "--preset", "llada-8b", "--config-only"])
    cfg = read_config(tmp_path)
    shapes = (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size)
    assert shapes == (4096, 32, 32, 32, 12288, 126464) and cfg.max_position == 4096
    assert not list(tmp_path.glob("*.safetensors"))
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer) == cfg.vocab_size
    assert (tokenizer.mask_token_id, tokenizer.eos_token_id) == (cfg.mask_token_id, cfg.eos_token_id)
    assert tokenizer.decode([cfg.vocab_size - 1]).strip()  # the random model's every id decodes to some text
    text = "What is 12 plus 30?"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_dummy_load_format_draws_the_configs_weights_at_random(tmp_path):
    make_random([str(tmp_path), "--preset", "tiny", "--config-only", "--layers", "1"])
    loaded = load_model(tmp_path, dtype="bfloat16", device="cpu", load_format="dummy")
    weight = loaded.model.layers[0].mlp.up_proj.weight
    assert loaded.config.num_layers == 1 and weight.dtype == torch.bfloat16
    assert abs(weight.float().std().item() - 0.02) < 0.002


def test_dummy_load_format_without_config_json_says_how_to_write_one(tmp_path):
    with pytest.raises(CheckpointError, match="config.json.*make_random .* --config-only"):
        load_model(tmp_path, load_format="dummy")


def test_an_unknown_load_format_is_refused():
    with pytest.raises(ValueError, match="load_format"):
        EngineConfig(model_dir="unused", load_format="safetensors")


def test_loaded_models_run_fused_projections_that_share_the_weights_and_match_separate_ones(model_dir):
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    fused = loaded.model
    attn, mlp = fused.layers[0].attn, fused.layers[0].mlp
    # The layers' parameters are views of the stacked weights: nothing is stored twice.
    assert attn.qkv is not None and mlp.gate_up is not None
    assert attn.k_proj.weight.data_ptr() == attn.qkv.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up.weight.untyped_storage().data_ptr()
    separate = DiffusionTransformer(loaded.config)
    separate.load_state_dict(fused.state_dict())
    assert separate.layers[0].attn.qkv is None
    ids = torch.randint(0, loaded.config.vocab_size, (2, 9))
    torch.testing.assert_close(fused.forward_dense(ids), separate.forward_dense(ids), rtol=1e-5, atol=1e-5)

"""Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B): a Qwen2 backbone as a diffusion LM.

Differences from LLaDA that matter to the engine: q/k/v carry biases, GQA, and
the logits are shifted — the token at position i is predicted by the output at
position i - 1 (`logits_shift = 1`).
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture, require
from unmask.engine.models.config import ModelConfig

DEFAULT_MASK_TOKEN_ID = 151666  # Dream's <|mask|>

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def parse_config(hf: dict) -> ModelConfig:
    heads = require(hf, "num_attention_heads")
    eos = require(hf, "eos_token_id")
    return ModelConfig(
        arch="dream",
        hidden_size=require(hf, "hidden_size"),
        num_layers=require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=require(hf, "intermediate_size"),
        vocab_size=require(hf, "vocab_size"),
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        rope_theta=float(hf.get("rope_theta", 1e6)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=hf.get("max_position_embeddings", 32768),
        qkv_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        logits_shift=1,
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.rms_norm_eps,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


DREAM = Architecture(("dream",), parse_config, to_hf_config, tensor_names)

"""Tensor names of the Qwen2 / Qwen3 checkpoint layout (Dream, SDAR, Fast-dLLM v2 share it)."""

from __future__ import annotations

from unmask.engine.models.arch import CheckpointError, require
from unmask.engine.models.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_BIAS_NAMES = {  # Qwen2 only
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
}
_QK_NORM_NAMES = {  # Qwen3 only
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}


def qwen_tensor_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter names -> the checkpoint's, with q/k/v biases and q/k norms as `cfg` has them."""
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    per_layer = dict(_LAYER_NAMES, **(_BIAS_NAMES if cfg.qkv_bias else {}), **(_QK_NORM_NAMES if cfg.qk_norm else {}))
    for i in range(cfg.num_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def first_id(value: int | list[int]) -> int:
    """A config's token id field, which Qwen configs may give as a list: its first entry."""
    return value[0] if isinstance(value, list) else value


def qwen_shapes(hf: dict, default_rope_theta: float = 1e6) -> dict:
    """The `ModelConfig` fields every Qwen-layout config states the same way (shapes, RoPE, norm, ids)."""
    heads = require(hf, "num_attention_heads")
    return dict(
        hidden_size=require(hf, "hidden_size"),
        num_layers=require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=require(hf, "intermediate_size"),
        vocab_size=require(hf, "vocab_size"),
        eos_token_id=first_id(require(hf, "eos_token_id")),
        rope_theta=float(hf.get("rope_theta", default_rope_theta)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def qwen_hf_config(cfg: ModelConfig) -> dict:
    """The Qwen-layout config fields of `cfg` (a family adds its model_type, architectures and own fields)."""
    return {
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


def reject_rope_scaling(hf: dict, family: str) -> None:
    """Only plain RoPE is implemented: a scaled one (YaRN, dynamic) would load and write wrong text."""
    if hf.get("rope_scaling"):
        raise CheckpointError(f"{family} config has rope_scaling={hf['rope_scaling']!r}; only plain RoPE is supported")

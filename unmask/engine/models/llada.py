"""LLaDA (GSAI-ML/LLaDA-8B-Base and -Instruct): config fields and tensor names.

The public checkpoints use the OLMo "llama" block: `ff_proj` is the SwiGLU gate
(SiLU applied), `up_proj` the linear branch and `ff_out` the down projection;
`model.transformer.ff_out` is the LM head unless `weight_tying` is set.
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture, CheckpointError, require
from unmask.engine.models.config import ModelConfig

DEFAULT_MASK_TOKEN_ID = 126336  # LLaDA's [MASK]; older configs omit the field

_PREFIX = "model.transformer"
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "q_proj.weight",
    "attn.k_proj.weight": "k_proj.weight",
    "attn.v_proj.weight": "v_proj.weight",
    "attn.o_proj.weight": "attn_out.weight",
    "mlp_norm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}
_BIAS_NAMES = {"attn.q_proj.bias": "q_proj.bias", "attn.k_proj.bias": "k_proj.bias", "attn.v_proj.bias": "v_proj.bias"}


def parse_config(hf: dict) -> ModelConfig:
    _reject_unsupported(hf)
    n_heads = require(hf, "n_heads")
    return ModelConfig(
        arch="llada",
        hidden_size=require(hf, "d_model"),
        num_layers=require(hf, "n_layers"),
        num_heads=n_heads,
        num_kv_heads=hf.get("n_kv_heads") or n_heads,
        intermediate_size=require(hf, "mlp_hidden_size"),
        vocab_size=hf.get("embedding_size") or require(hf, "vocab_size"),
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        eos_token_id=require(hf, "eos_token_id"),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_position=hf.get("max_sequence_length", 4096),
        qkv_bias=bool(hf.get("include_bias", False) or hf.get("include_qkv_bias", False)),
        tie_word_embeddings=bool(hf.get("weight_tying", False)),
        logits_shift=0,
    )


def _reject_unsupported(hf: dict) -> None:
    checks = {
        "block_type": ("llama",),
        "activation_type": ("silu", "swiglu"),
        "layer_norm_type": ("rms",),
    }
    for key, allowed in checks.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"LLaDA config {key}={hf[key]!r} is not supported (supported: {allowed})")
    if hf.get("alibi") or hf.get("rope") is False:
        raise CheckpointError("LLaDA configs without RoPE (alibi) are not supported")


def to_hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "block_type": "llama",
        "layer_norm_type": "rms",
        "rope": True,
        "alibi": False,
        "d_model": cfg.hidden_size,
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads,
        "n_kv_heads": cfg.num_kv_heads,
        "mlp_hidden_size": cfg.intermediate_size,
        "mlp_ratio": max(1, cfg.intermediate_size // cfg.hidden_size),
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_position,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_token_id,
        "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias,
        "weight_tying": cfg.tie_word_embeddings,
    }


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": f"{_PREFIX}.wte.weight", "final_norm.weight": f"{_PREFIX}.ln_f.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = f"{_PREFIX}.ff_out.weight"
    per_layer = dict(_LAYER_NAMES, **(_BIAS_NAMES if cfg.qkv_bias else {}))
    for i in range(cfg.num_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"{_PREFIX}.blocks.{i}.{theirs}"
    return names


LLADA = Architecture(
    ("llada",), parse_config, to_hf_config, tensor_names,
    claims=lambda hf: "num_experts" not in hf,  # LLaDA-MoE's released config says `llada` too
)

__all__ = ["LLADA", "CheckpointError"]

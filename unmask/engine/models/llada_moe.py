"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B-Base and -Instruct): config fields and tensor names.

An OLMoE-shaped masked diffusion LM with full bidirectional attention, so
every cache and unmask policy applies as for LLaDA-8B. Its `model_type` is
`lladamoe`, or `llada` in the released config.json (told apart from LLaDA-8B
by its experts). What the reference modeling code computes:

- attention: separate q/k/v/o projections (`self_attn.*`), an RMSNorm over each
  head's q and k before RoPE when `qk_layernorm`, no biases;
- the feed-forward of each layer whose `moe_layer_freq` entry is 1: `num_experts`
  SwiGLU experts of width `expert_intermediate_size`; the router (`mlp.gate`,
  in the model's dtype) takes the softmax of its logits in float32, adds the
  per-expert `mlp.expert_bias` when `moe_router_enable_expert_bias` (the chosen
  weights keep it), takes the top `num_experts_per_tok` and never renormalises
  them (its code fixes `norm_topk_prob` to False), casting the weights to the
  model's dtype; a `shared_expert` at the layer (width
  `shared_expert_intermediate_size`) when the config has one; other layers a
  dense SwiGLU of width `dense_intermediate_size`;
- the token at position i is read from output i; the mask token is 156895 and
  end-of-text 156892 unless the config names them.
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture, CheckpointError, require
from unmask.engine.models.config import ModelConfig, MoEConfig
from unmask.engine.models.expert_names import routed_expert_names, swiglu_names
from unmask.engine.models.qwen import first_id, reject_rope_scaling

DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_QK_NORM_NAMES = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}


def parse_config(hf: dict) -> ModelConfig:
    _reject_unsupported(hf)
    heads = require(hf, "num_attention_heads")
    layers = require(hf, "num_hidden_layers")
    return ModelConfig(
        arch="llada-moe",
        hidden_size=require(hf, "hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf.get("dense_intermediate_size") or require(hf, "intermediate_size"),
        vocab_size=require(hf, "vocab_size"),
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        eos_token_id=first_id(hf.get("eos_token_id", DEFAULT_EOS_TOKEN_ID)),
        rope_theta=float(hf.get("rope_theta", 50000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_position=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=bool(hf.get("qk_layernorm", False)),
        explicit_rotary_dim=_rotary_dim(hf),
        moe=MoEConfig(
            num_experts=require(hf, "num_experts"),
            top_k=require(hf, "num_experts_per_tok"),
            expert_intermediate_size=require(hf, "expert_intermediate_size"),
            shared_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
            dense_layers=tuple(i for i, moe in enumerate(hf.get("moe_layer_freq") or [1] * layers) if not moe),
            scoring="softmax",
            expert_bias="weights" if hf.get("moe_router_enable_expert_bias") else None,
        ),
    )


def _rotary_dim(hf: dict) -> int | None:
    factor = float(hf.get("partial_rotary_factor", 1.0))
    return None if factor == 1.0 else int(hf["hidden_size"] // hf["num_attention_heads"] * factor)


def _reject_unsupported(hf: dict) -> None:
    reject_rope_scaling(hf, "LLaDA-MoE")
    if hf.get("attention_bias"):
        raise CheckpointError("LLaDA-MoE configs with attention_bias are not supported")
    if hf.get("clip_qkv") is not None:
        raise CheckpointError(f"LLaDA-MoE config clip_qkv={hf['clip_qkv']!r} is not supported")
    if hf.get("moe_router_score_function", "softmax") != "softmax":
        raise CheckpointError(f"LLaDA-MoE router score {hf['moe_router_score_function']!r} is not supported (softmax)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"LLaDA-MoE hidden_act {hf['hidden_act']!r} is not supported (silu)")


def to_hf_config(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    assert moe is not None
    hf = {
        "architectures": ["LLaDAMoEModelLM"],
        "model_type": "lladamoe",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "dense_intermediate_size": cfg.intermediate_size,
        "expert_intermediate_size": moe.expert_intermediate_size,
        "shared_expert_intermediate_size": moe.shared_intermediate_size or None,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_layer_freq": [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)],
        "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": moe.expert_bias is not None,
        "norm_topk_prob": False,
        "qk_layernorm": cfg.qk_norm,
        "attention_bias": False,
        "clip_qkv": None,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": cfg.rms_norm_eps,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if cfg.explicit_rotary_dim:
        hf["partial_rotary_factor"] = cfg.explicit_rotary_dim / cfg.head_dim
    return hf


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    moe = cfg.moe
    assert moe is not None
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    per_layer = dict(_LAYER_NAMES, **(_QK_NORM_NAMES if cfg.qk_norm else {}))
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in per_layer.items()})
        if not cfg.is_moe_layer(i):
            names.update(swiglu_names(f"{ours}.mlp", f"{theirs}.mlp"))
            continue
        names[f"{ours}.mlp.gate.weight"] = f"{theirs}.mlp.gate.weight"
        if moe.expert_bias:
            names[f"{ours}.mlp.gate.expert_bias"] = f"{theirs}.mlp.expert_bias"
        names.update(routed_expert_names(f"{ours}.mlp", f"{theirs}.mlp", moe.num_experts))
        if moe.shared_intermediate_size:
            names.update(swiglu_names(f"{ours}.mlp.shared_expert", f"{theirs}.shared_expert"))
    return names


LLADA_MOE = Architecture(("lladamoe", "llada_moe", "llada-moe", "llada"), parse_config, to_hf_config, tensor_names)

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
from unmask.engine.models.expert_names import feed_forward_names
from unmask.engine.models.qwen import qwen_hf_config, qwen_shapes, qwen_tensor_names, reject_rope_scaling

DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892


def parse_config(hf: dict) -> ModelConfig:
    _reject_unsupported(hf)
    layers = require(hf, "num_hidden_layers")
    dense_width = hf.get("dense_intermediate_size") or require(hf, "intermediate_size")
    return ModelConfig(
        arch="llada-moe",
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
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
        **qwen_shapes(
            {"eos_token_id": DEFAULT_EOS_TOKEN_ID, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192} | hf
            | {"intermediate_size": dense_width},
            default_rope_theta=50000.0,
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
    hf = {"architectures": ["LLaDAMoEModelLM"], "model_type": "lladamoe"} | qwen_hf_config(cfg) | {
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
    }
    if cfg.explicit_rotary_dim:
        hf["partial_rotary_factor"] = cfg.explicit_rotary_dim / cfg.head_dim
    return hf


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    """Qwen3's names for everything but the feed-forward (LLaDA-MoE's attention is named as Qwen3's)."""
    names = {ours: theirs for ours, theirs in qwen_tensor_names(cfg).items() if ".mlp." not in ours}
    for i in range(cfg.num_layers):
        names |= feed_forward_names(cfg, i, bias="mlp.expert_bias", shared="shared_expert")
    return names


LLADA_MOE = Architecture(("lladamoe", "llada_moe", "llada-moe", "llada"), parse_config, to_hf_config, tensor_names)

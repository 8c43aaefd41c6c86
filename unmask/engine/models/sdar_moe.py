"""SDAR-MoE (JetLM/SDAR-30B-A3B-Chat): a Qwen3-MoE backbone trained as a block-diffusion LM.

Attention, norms, names and block-causal decoding are SDAR's (`sdar.py`):
per-head q/k norms, blocks of `block_size` (4 when the config has none),
mask token `<|MASK|>` 151669. The feed-forward is Qwen3-MoE's: every layer
but those in `mlp_only_layers` (and, with `decoder_sparse_step` > 1, those
off its stride) routes each token to `num_experts_per_tok` of `num_experts`
SwiGLU experts of width `moe_intermediate_size` (`mlp.experts.{e}.*`); the
router (`mlp.gate`, in the model's dtype) takes the softmax of its logits in
float32, keeps the top k, renormalises them when `norm_topk_prob`, and casts
them to the model's dtype. There is no shared expert.
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture, require
from unmask.engine.models.config import ModelConfig, MoEConfig
from unmask.engine.models.expert_names import routed_expert_names
from unmask.engine.models.qwen import qwen_hf_config, qwen_shapes, qwen_tensor_names, reject_rope_scaling
from unmask.engine.models.sdar import DEFAULT_BLOCK_SIZE, DEFAULT_MASK_TOKEN_ID


def parse_config(hf: dict) -> ModelConfig:
    reject_rope_scaling(hf, "SDAR-MoE")
    layers = require(hf, "num_hidden_layers")
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step}
    return ModelConfig(
        arch="sdar-moe",
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        qkv_bias=bool(hf.get("attention_bias", False)),
        explicit_head_dim=hf.get("head_dim"),
        qk_norm=True,
        attention_block_size=int(hf.get("block_size") or DEFAULT_BLOCK_SIZE),
        moe=MoEConfig(
            num_experts=require(hf, "num_experts"),
            top_k=require(hf, "num_experts_per_tok"),
            expert_intermediate_size=require(hf, "moe_intermediate_size"),
            dense_layers=tuple(sorted(dense)),
            normalize=bool(hf.get("norm_topk_prob", False)),
        ),
        **qwen_shapes(hf),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    assert moe is not None
    return {"architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe"} | qwen_hf_config(cfg) | {
        "head_dim": cfg.head_dim,
        "attention_bias": cfg.qkv_bias,
        "block_size": cfg.attention_block_size,
        "moe_intermediate_size": moe.expert_intermediate_size,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.normalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(moe.dense_layers),
    }


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    moe = cfg.moe
    assert moe is not None
    names = qwen_tensor_names(cfg)
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            ours, theirs = f"layers.{i}.mlp", f"model.layers.{i}.mlp"
            names = {k: v for k, v in names.items() if not k.startswith(f"{ours}.")}
            names[f"{ours}.gate.weight"] = f"{theirs}.gate.weight"
            names |= routed_expert_names(ours, theirs, moe.num_experts)
    return names


SDAR_MOE = Architecture(("sdar_moe", "sdar-moe"), parse_config, to_hf_config, tensor_names)

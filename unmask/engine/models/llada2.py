"""LLaDA2.0 / 2.1 (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-mini): the BailingMoE-V2 layout as a block-diffusion LM.

`model_type` is `llada2_moe`. What the reference modeling code computes:

- attention: q, k and v in ONE tensor `attention.query_key_value` (rows: the
  query heads, then the key heads, then the value heads), read here as `Rows`
  of it into our q/k/v projections; `attention.dense` the output projection;
  an RMSNorm over each head's q and k (`query_layernorm`, `key_layernorm`)
  before RoPE; RoPE on each head's leading `partial_rotary_factor` part only;
- block-causal attention over blocks of 32 positions from position 0 (the
  block its reference generation is trained and decoded with);
- the first `first_k_dense_replace` layers a dense SwiGLU (`intermediate_size`),
  the others `num_experts` routed experts (`moe_intermediate_size`) plus a shared
  expert of `num_shared_experts` x that width (`mlp.shared_experts`);
- the router (`mlp.gate`) in float32: sigmoid scores; `mlp.gate.expert_bias`
  added for choosing the experts only; the experts grouped into `n_group`
  groups, each scored by its two best biased scores, only the best
  `topk_group` groups eligible; the chosen unbiased scores divided by their sum
  (with more than one expert per token) and multiplied by `routed_scaling_factor`;
- the token at position i is read from output i; the mask token is 156895,
  end-of-text 156892, unless the config names them.
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture, CheckpointError, Rows, require
from unmask.engine.models.config import ModelConfig, MoEConfig
from unmask.engine.models.expert_names import feed_forward_names
from unmask.engine.models.qwen import qwen_hf_config, qwen_shapes, reject_rope_scaling

DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892
TRAINED_BLOCK_SIZE = 32

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.o_proj.weight": "attention.dense.weight",
    "attn.q_norm.weight": "attention.query_layernorm.weight",
    "attn.k_norm.weight": "attention.key_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}


def parse_config(hf: dict) -> ModelConfig:
    _reject_unsupported(hf)
    heads = require(hf, "num_attention_heads")
    hidden = require(hf, "hidden_size")
    head_dim = hf.get("head_dim") or hidden // heads
    factor = float(hf.get("partial_rotary_factor", 1.0))
    top_k = require(hf, "num_experts_per_tok")
    expert_width = require(hf, "moe_intermediate_size")
    return ModelConfig(
        arch="llada2",
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        qkv_bias=bool(hf.get("use_qkv_bias", False)),
        explicit_head_dim=head_dim,
        qk_norm=True,
        attention_block_size=TRAINED_BLOCK_SIZE,
        explicit_rotary_dim=None if factor == 1.0 else int(head_dim * factor),
        moe=MoEConfig(
            num_experts=require(hf, "num_experts"),
            top_k=top_k,
            expert_intermediate_size=expert_width,
            shared_intermediate_size=expert_width * (hf.get("num_shared_experts") or 0),
            dense_layers=tuple(range(hf.get("first_k_dense_replace", 0))),
            scoring=hf.get("score_function", "sigmoid"),
            expert_bias="selection" if hf.get("moe_router_enable_expert_bias", True) else None,
            num_groups=hf.get("n_group") or 1,
            top_groups=hf.get("topk_group") or 1,
            normalize=bool(hf.get("norm_topk_prob", True)) and top_k > 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            router_float32=True,
        ),
        **qwen_shapes({"eos_token_id": DEFAULT_EOS_TOKEN_ID} | hf, default_rope_theta=600000.0),
    )


def _reject_unsupported(hf: dict) -> None:
    reject_rope_scaling(hf, "LLaDA2")
    if hf.get("use_bias"):
        raise CheckpointError("LLaDA2 configs with use_bias (biased output projections) are not supported")
    if hf.get("use_qk_norm") is False:
        raise CheckpointError("LLaDA2 configs without q/k norms (use_qk_norm=false) are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"LLaDA2 hidden_act {hf['hidden_act']!r} is not supported (silu)")


def to_hf_config(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    assert moe is not None
    return {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe"} | qwen_hf_config(cfg) | {
        "head_dim": cfg.head_dim,
        "moe_intermediate_size": moe.expert_intermediate_size,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "num_shared_experts": moe.shared_intermediate_size // moe.expert_intermediate_size or None,
        "first_k_dense_replace": len(moe.dense_layers),
        "score_function": moe.scoring,
        "moe_router_enable_expert_bias": moe.expert_bias is not None,
        "n_group": moe.num_groups,
        "topk_group": moe.top_groups,
        "norm_topk_prob": moe.normalize,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "router_dtype": "fp32",
        "use_qkv_bias": cfg.qkv_bias,
        "use_bias": False,
        "use_qk_norm": True,
        "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim,
    }


def tensor_names(cfg: ModelConfig) -> dict[str, str | Rows]:
    names: dict[str, str | Rows] = {"embed.weight": "model.word_embeddings.weight", "final_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    fused_rows = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _LAYER_NAMES.items()})
        for part in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            key = f"{theirs}.attention.query_key_value.{part}"
            names.update({f"{ours}.attn.{proj}.{part}": Rows(key, *rows) for proj, rows in fused_rows.items()})
        names.update(feed_forward_names(cfg, i, bias="mlp.gate.expert_bias", shared="mlp.shared_experts"))
    return names


LLADA2 = Architecture(("llada2_moe", "llada2"), parse_config, to_hf_config, tensor_names)

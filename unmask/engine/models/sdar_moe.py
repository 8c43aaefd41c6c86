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

from dataclasses import replace

from unmask.engine.models import sdar
from unmask.engine.models.arch import Architecture, require
from unmask.engine.models.config import ModelConfig, MoEConfig
from unmask.engine.models.expert_names import feed_forward_names
from unmask.engine.models.qwen import qwen_tensor_names


def parse_config(hf: dict) -> ModelConfig:
    """SDAR's fields (`sdar.parse_config`) with Qwen3-MoE's experts."""
    layers = require(hf, "num_hidden_layers")
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or []) | {i for i in range(layers) if (i + 1) % step}
    moe = MoEConfig(
        num_experts=require(hf, "num_experts"),
        top_k=require(hf, "num_experts_per_tok"),
        expert_intermediate_size=require(hf, "moe_intermediate_size"),
        dense_layers=tuple(sorted(dense)),
        normalize=bool(hf.get("norm_topk_prob", False)),
    )
    return replace(sdar.parse_config(hf), arch="sdar-moe", moe=moe)


def to_hf_config(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    assert moe is not None
    return sdar.to_hf_config(cfg) | {
        "architectures": ["SDARMoeForCausalLM"],
        "model_type": "sdar_moe",
        "moe_intermediate_size": moe.expert_intermediate_size,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.normalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(moe.dense_layers),
    }


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    names = {ours: theirs for ours, theirs in qwen_tensor_names(cfg).items() if ".mlp." not in ours}
    for i in range(cfg.num_layers):
        names |= feed_forward_names(cfg, i)
    return names


SDAR_MOE = Architecture(("sdar_moe", "sdar-moe"), parse_config, to_hf_config, tensor_names)

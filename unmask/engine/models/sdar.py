"""SDAR (JetLM/SDAR-1.7B/4B/8B-Chat): a Qwen3 backbone trained as a block-diffusion LM.

Tensor names and shapes are Qwen3's: no q/k/v bias (unless `attention_bias`),
an RMSNorm over each head's q and k before the rotation, `head_dim` stated in
the config (SDAR-4B's differs from hidden_size / heads), tied or untied
embeddings as `tie_word_embeddings` says. Attention is block-causal with the
trained block size (`block_size` in the config; the released chat models use
4, which is what a config without the field gets). The token at position i is
read from the output at i (no shift), as in SDAR's reference decoding, which
also fixes the mask token: `<|MASK|>`, id 151669, unless the config names one.
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.qwen import qwen_hf_config, qwen_shapes, qwen_tensor_names, reject_rope_scaling

DEFAULT_MASK_TOKEN_ID = 151669  # <|MASK|>
DEFAULT_BLOCK_SIZE = 4  # the released SDAR-*-Chat models' training block


def parse_config(hf: dict) -> ModelConfig:
    reject_rope_scaling(hf, "SDAR")
    return ModelConfig(
        arch="sdar",
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        qkv_bias=bool(hf.get("attention_bias", False)),
        explicit_head_dim=hf.get("head_dim"),
        qk_norm=True,
        attention_block_size=int(hf.get("block_size") or DEFAULT_BLOCK_SIZE),
        **qwen_shapes(hf),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["SDARForCausalLM"], "model_type": "sdar"} | qwen_hf_config(cfg) | {
        "head_dim": cfg.head_dim,
        "attention_bias": cfg.qkv_bias,
        "block_size": cfg.attention_block_size,
    }


SDAR = Architecture(("sdar",), parse_config, to_hf_config, qwen_tensor_names)

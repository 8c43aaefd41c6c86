"""Fast-dLLM v2 (Efficient-Large-Model/Fast_dLLM_v2_1.5B and _7B): Qwen2.5 fine-tuned to block diffusion.

Tensor names and shapes are Qwen2's (q/k/v biases, GQA); `model_type` is
`Fast_dLLM_Qwen`. Attention is block-causal with `bd_size` positions per block
(32); its own decoding commits a block in sub-blocks of 8 (the reference's
`small_block_size`, not a config field: `small_block_size` is read if a config
has it). As in the autoregressive model it comes from, the token at position i
is read from the output at i - 1 (`logits_shift = 1`); a block's first token is
therefore predicted by the previous block's last position. The mask token is
`|<MASK>|`, id 151665, unless the config names one.
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.qwen import qwen_hf_config, qwen_shapes, qwen_tensor_names, reject_rope_scaling

DEFAULT_MASK_TOKEN_ID = 151665  # |<MASK>|
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SUB_BLOCK_SIZE = 8


def parse_config(hf: dict) -> ModelConfig:
    reject_rope_scaling(hf, "Fast-dLLM v2")
    return ModelConfig(
        arch="fastdllm-v2",
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        qkv_bias=True,
        logits_shift=1,
        attention_block_size=int(hf.get("bd_size") or DEFAULT_BLOCK_SIZE),
        sub_block_size=int(hf.get("small_block_size") or DEFAULT_SUB_BLOCK_SIZE),
        **qwen_shapes(hf),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen"} | qwen_hf_config(cfg) | {
        "bd_size": cfg.attention_block_size,
        "small_block_size": cfg.sub_block_size,
    }


FASTDLLM_V2 = Architecture(("fast_dllm_qwen", "fastdllm-v2"), parse_config, to_hf_config, qwen_tensor_names)

"""Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B): a Qwen2 backbone as a diffusion LM.

Differences from LLaDA that matter to the engine: q/k/v carry biases, GQA, and
the logits are shifted — the token at position i is predicted by the output at
position i - 1 (`logits_shift = 1`).
"""

from __future__ import annotations

from unmask.engine.models.arch import Architecture
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.qwen import qwen_hf_config, qwen_shapes, qwen_tensor_names

DEFAULT_MASK_TOKEN_ID = 151666  # Dream's <|mask|>


def parse_config(hf: dict) -> ModelConfig:
    return ModelConfig(
        arch="dream",
        mask_token_id=hf.get("mask_token_id", DEFAULT_MASK_TOKEN_ID),
        qkv_bias=True,
        logits_shift=1,
        **qwen_shapes(hf),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["DreamModel"], "model_type": "Dream"} | qwen_hf_config(cfg)


DREAM = Architecture(("dream",), parse_config, to_hf_config, qwen_tensor_names)

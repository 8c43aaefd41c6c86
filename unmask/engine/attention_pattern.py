"""What a model's attention pattern means for its requests: block layout, default and allowed methods.

Full-attention models (LLaDA, Dream) take every method. A block-causal model
(SDAR, Fast-dLLM v2) is decoded in its trained blocks, counted from position
0 (`BlockLayout`); its default cache is the exact block KV cache (`block`),
and the caches that approximate full attention are refused: with block-causal
attention a committed block's K/V are already exact, so there is nothing for
them to approximate, and their refresh schedules assume the blocks start at
the prompt's end.
"""

from __future__ import annotations

from dataclasses import replace

from unmask.engine.models.config import ModelConfig
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams
from unmask.engine.policies import CACHE_POLICIES
from unmask.engine.sequence import BlockLayout

BLOCK_CAUSAL_DEFAULT_CACHE = "block"


def block_layout(cfg: ModelConfig) -> BlockLayout | None:
    """The block layout of a block-causal model's sequences; None for full attention."""
    if cfg.attention_block_size is None:
        return None
    return BlockLayout(cfg.attention_block_size, cfg.sub_block_size, first_token_alone=cfg.logits_shift == 1)


def model_defaults(defaults: EngineDefaults, cfg: ModelConfig) -> EngineDefaults:
    """The server's defaults as they apply to `cfg`: a block-causal model's blocks and cache are its own."""
    if cfg.attention_block_size is None:
        return defaults
    return replace(defaults, block_length=cfg.attention_block_size, cache=BLOCK_CAUSAL_DEFAULT_CACHE)


def cache_fits(cache: str, cfg: ModelConfig) -> bool:
    """Whether the cache policy named `cache` is right for the model's attention pattern."""
    policy = CACHE_POLICIES[cache]
    return not (policy.full_attention_only if cfg.block_causal else policy.block_causal_only)


def check_attention_fit(params: SamplingParams, cfg: ModelConfig) -> None:
    """Refuse (naming the field) a cache or block length the model's attention pattern cannot serve."""
    if cfg.attention_block_size is None:
        if not cache_fits(params.cache, cfg):
            raise ParamError(
                "cache", f"cache={params.cache!r} is for block-causal models (SDAR, Fast-dLLM v2); this model attends bidirectionally"
            )
        return
    if not cache_fits(params.cache, cfg):
        raise ParamError(
            "cache",
            f"cache={params.cache!r} approximates full attention, and this model's attention is block-causal: "
            f"committed blocks' K/V are already exact. Use cache='block' (the default) or 'none'",
        )
    if params.block_length != cfg.attention_block_size:
        raise ParamError(
            "block_length",
            f"this model is block-causal with blocks of {cfg.attention_block_size} tokens; block_length must be "
            f"{cfg.attention_block_size} (or left unset), got {params.block_length}",
        )

"""What a model's attention pattern means for its requests: block layout, default and allowed methods.

Full-attention models (LLaDA, Dream) take every method. A block-causal model
(SDAR, Fast-dLLM v2) is decoded in its trained blocks, counted from position
0 (`BlockLayout`); its default cache is the exact block KV cache (`block`),
and the caches that approximate full attention are refused: with block-causal
attention a committed block's K/V are already exact, so there is nothing for
them to approximate, and their refresh schedules assume the blocks start at
the prompt's end.

A block-causal model also keeps its own commit rules: SDAR's reference
spreads a block's tokens evenly over its steps (LLaDA's schedule) and
Fast-dLLM v2's writes each block's first token alone before denoising the
rest (`BlockLayout.first_token_alone`), so Dream's timestep schedule and
Fast-dLLM's block-start rule for Dream are refused for them, and infilling
is too: a position attends only to its own and earlier blocks, so fixed text
after the canvas (or between its spans) would be seen by nothing before it.
"""

from __future__ import annotations

from dataclasses import replace

from unmask.engine.models.config import ModelConfig
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams
from unmask.engine.policies import CACHE_POLICIES
from unmask.engine.policies.suffix_window import check_suffix_window
from unmask.engine.sequence import BlockLayout

BLOCK_CAUSAL_DEFAULT_CACHE = "block"
BLOCK_CAUSAL_SCHEDULE = "llada"  # SDAR's even split of a block's tokens over its steps
BLOCK_CAUSAL_BLOCK_START = "confidence"  # the unmask policy chooses (Fast-dLLM v2's first token is the layout's)


def block_layout(cfg: ModelConfig) -> BlockLayout | None:
    """The block layout of a block-causal model's sequences; None for full attention."""
    if cfg.attention_block_size is None:
        return None
    return BlockLayout(cfg.attention_block_size, cfg.sub_block_size, first_token_alone=cfg.logits_shift == 1)


def model_defaults(defaults: EngineDefaults, cfg: ModelConfig) -> EngineDefaults:
    """The server's defaults as they apply to `cfg`: a block-causal model's blocks, cache and commit rules
    are its own."""
    if cfg.attention_block_size is None:
        return defaults
    return replace(
        defaults,
        block_length=cfg.attention_block_size,
        cache=BLOCK_CAUSAL_DEFAULT_CACHE,
        schedule=BLOCK_CAUSAL_SCHEDULE,
        block_start=BLOCK_CAUSAL_BLOCK_START,
        suffix_window=None,  # nothing past the current block is attended anyway
    )


def cache_fits(cache: str, cfg: ModelConfig) -> bool:
    """Whether the cache policy named `cache` is right for the model's attention pattern."""
    policy = CACHE_POLICIES[cache]
    return not (policy.full_attention_only if cfg.block_causal else policy.block_causal_only)


def check_attention_fit(params: SamplingParams, cfg: ModelConfig, fixed_text: bool) -> None:
    """Refuse (naming the field) a cache, block length, commit rule or infill (`fixed_text`) the model's
    attention pattern cannot serve."""
    if CACHE_POLICIES[params.cache].reads_suffix_window:
        check_suffix_window(params, cfg.block_causal, fixed_text)
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
    _check_block_causal_rules(params, fixed_text)


def _check_block_causal_rules(params: SamplingParams, fixed_text: bool) -> None:
    """Refuse on a block-causal model what its references do not do: Dream's schedule and block start, infill."""
    if params.schedule != BLOCK_CAUSAL_SCHEDULE:
        raise ParamError(
            "schedule",
            f"schedule={params.schedule!r} is Dream's; this model is block-causal and spreads a block's tokens "
            f"evenly over its steps: use schedule={BLOCK_CAUSAL_SCHEDULE!r} or 'auto' (or leave it unset)",
        )
    if params.block_start != BLOCK_CAUSAL_BLOCK_START:
        raise ParamError(
            "block_start",
            f"block_start={params.block_start!r} is Fast-dLLM's rule for Dream; this model is block-causal and "
            f"starts its blocks by its own rule: use block_start={BLOCK_CAUSAL_BLOCK_START!r} or 'auto' "
            f"(or leave it unset)",
        )
    if fixed_text:
        raise ParamError(
            "suffix",
            "this model is block-causal (SDAR, Fast-dLLM v2): a position attends only to its own and earlier "
            "blocks, so it cannot infill around fixed text after it; send the request without suffix",
        )

"""Sampling and denoising parameters of one request, validated in one place.

Every policy combination is selectable per request; `EngineDefaults` holds the
server-wide values a request inherits for the fields it leaves unset. The
methods' own parameters (`threshold`, `dllm_rho`, ...) are declared in
`engine.method_params`, which adds them to both classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from unmask.engine.checks import ParamError, check_bool, check_choice, check_float, check_int
from unmask.engine.method_params import METHOD_FIELDS, METHOD_PARAMS, add_method_fields

# The policy names a request may choose, spelled out rather than read from the registries
# in `engine.policies` (which need torch), so that the CLI parser and the protocol load
# without it; tests/test_methods.py checks that the registries implement exactly these.
CACHE_POLICIES = ("none", "prefix", "dual", "dkv", "dkv-greedy", "dllm-cache", "freecache", "block", "block-dual")
UNMASK_POLICIES = ("low_confidence", "random", "threshold", "factor", "guided", "joint_threshold")
CONFIDENCE_KINDS = ("prob", "margin", "entropy")
# How many tokens each step of a block commits under the fixed-step policies; "auto" is the
# checkpoint family's own rule (`engine.checkpoint_defaults`).
SCHEDULES = ("auto", "llada", "dream")
# Which rule commits a block's first position; "auto": Fast-dLLM's for Dream under its caches.
BLOCK_START_RULES = ("auto", "confidence", "first")

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default limit)

__all__ = [
    "BLOCK_START_RULES",
    "CACHE_POLICIES",
    "CONFIDENCE_KINDS",
    "MAX_LOGPROBS",
    "METHOD_FIELDS",
    "SCHEDULES",
    "UNMASK_POLICIES",
    "EngineDefaults",
    "ParamError",
    "SamplingParams",
    "check_logprobs",
    "check_text",
]


@dataclass(frozen=True)
@add_method_fields(lambda p: p.default)
class EngineDefaults:
    """Server-wide defaults for the denoising fields a request may leave unset (and one per method parameter)."""

    block_length: int = 32
    steps: int | None = None  # per block; None means one token per step
    cache: str = "none"
    unmask: str = "low_confidence"
    confidence: str = "prob"
    schedule: str = "auto"
    block_start: str = "auto"


@dataclass
@add_method_fields(lambda p: None)
class SamplingParams:
    """What one request asks for.

    `steps` counts denoising steps *per block* for the fixed-step policies
    (`low_confidence`, `random`); `None` means one token per step. Fields left
    `None` are filled from `EngineDefaults` by `resolve`. Each method
    parameter (`engine.method_params`) is a field too, None unless set.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # sample among the k likeliest tokens; 0 (or -1, vLLM's spelling) keeps them all
    min_p: float = 0.0  # drop tokens with probability below min_p x the top token's
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    block_length: int | None = None
    steps: int | None = None
    cache: str | None = None
    unmask: str | None = None
    confidence: str | None = None
    schedule: str | None = None  # tokens per step of low_confidence/random: llada (even) or dream (timesteps)
    block_start: str | None = None  # first: a block's first position is committed alone at the block's first step
    stream_blocks: bool = False
    ignore_eos: bool = False  # run to max_tokens: end-of-text neither ends the request nor cuts its tokens
    # Commit-time log-probabilities: None records none; k records each committed token's
    # log-probability at the step that committed it, with that step's k likeliest alternatives.
    logprobs: int | None = None

    def resolve(self, defaults: EngineDefaults) -> "SamplingParams":
        """Return a copy with every unset denoising field taken from `defaults`, validated."""
        filled = replace(
            self,
            stop=list(self.stop),
            block_length=_pick(self.block_length, defaults.block_length),
            steps=_pick(self.steps, defaults.steps),
            cache=_pick(self.cache, defaults.cache),
            unmask=_pick(self.unmask, defaults.unmask),
            confidence=_pick(self.confidence, defaults.confidence),
            # "auto" is the checkpoint family's schedule, which the engine's defaults already name.
            schedule=defaults.schedule if self.schedule in (None, "auto") else self.schedule,
            block_start=_pick(self.block_start, defaults.block_start),
            **{p.name: _pick(getattr(self, p.name), getattr(defaults, p.name)) for p in METHOD_PARAMS},
        )
        filled.validate()
        _check_method_fields(self, filled)
        return filled

    @property
    def block_size(self) -> int:
        """The block length actually used: never longer than the canvas."""
        assert self.block_length is not None
        return min(self.block_length, self.max_tokens)

    @property
    def steps_per_block(self) -> int:
        """Denoising steps per full block for the fixed-step policies."""
        return self.block_size if self.steps is None else self.steps

    def steps_for_block(self, block_tokens: int) -> int:
        """Denoising steps the fixed-step policies spend on a block of `block_tokens` tokens.

        A short last block keeps the tokens-per-step rate of a full block.
        """
        return max(1, -(-block_tokens * self.steps_per_block // self.block_size))

    def validate(self) -> None:
        """Raise `ParamError` naming the first invalid field."""
        check_int("max_tokens", self.max_tokens, low=1)
        check_float("temperature", self.temperature, low=0.0, high=100.0)
        check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_int("top_k", self.top_k, low=-1)
        check_float("min_p", self.min_p, low=0.0, high=1.0)
        if self.logprobs is not None:
            check_logprobs(self.logprobs)
        if self.seed is not None:
            check_int("seed", self.seed, low=0, high=2**63 - 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", "stop must be a list of non-empty strings")
        check_int("block_length", self.block_length, low=1)
        check_choice("cache", self.cache, CACHE_POLICIES)
        check_choice("unmask", self.unmask, UNMASK_POLICIES)
        check_choice("confidence", self.confidence, CONFIDENCE_KINDS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("block_start", self.block_start, BLOCK_START_RULES)
        for param in METHOD_PARAMS:
            param.check(getattr(self, param.name))
        for name in ("stream_blocks", "ignore_eos"):
            check_bool(name, getattr(self, name))
        if self.steps is not None:
            check_int("steps", self.steps, low=1)
            if self.steps > self.block_size:
                raise ParamError(
                    "steps",
                    f"steps ({self.steps}) cannot exceed the block length ({self.block_size}): "
                    "each step commits at least one token",
                )


def _pick(value, default):
    return default if value is None else value


def _check_method_fields(request: SamplingParams, resolved: SamplingParams) -> None:
    """A method's own parameter, set on a request that uses another method, is a mistake: say so.

    (Parameters declared not `exclusive`, `threshold` and `factor`, predate this rule and stay lenient.)
    """
    for name, (kind, methods) in METHOD_FIELDS.items():
        chosen = getattr(resolved, kind)
        if getattr(request, name) is not None and chosen not in methods:
            allowed = " or ".join(repr(m) for m in methods)
            raise ParamError(name, f"{name} applies to {kind}={allowed}; this request uses {kind}={chosen!r}")


def check_logprobs(value) -> None:
    """A number of likeliest alternatives to report per token."""
    check_int("logprobs", value, low=0, high=MAX_LOGPROBS)


def check_text(name: str, text: str) -> None:
    """Refuse text that is not valid Unicode.

    JSON escapes can carry lone surrogates (`"\\ud800"`): Python accepts them in a
    `str`, but no tokenizer can encode them, so they must be a 400, not a crash.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParamError(name, f"{name} is not valid Unicode: a lone surrogate at character {exc.start}") from None

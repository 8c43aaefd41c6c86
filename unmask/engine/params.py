"""Sampling and denoising parameters of one request, validated in one place.

Every policy combination is selectable per request; `EngineDefaults` holds the
server-wide values a request inherits for the fields it leaves unset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# The policy names a request may choose, spelled out rather than read from the registries
# in `engine.policies` (which need torch), so that the CLI parser and the protocol load
# without it; tests/test_methods.py checks that the registries implement exactly these.
CACHE_POLICIES = ("none", "prefix", "dual", "dkv", "dkv-greedy", "dllm-cache", "freecache")
UNMASK_POLICIES = ("low_confidence", "random", "threshold", "factor", "guided")
CONFIDENCE_KINDS = ("prob", "margin", "entropy")
# How many tokens each step of a block commits under the fixed-step policies; "auto" is the
# checkpoint family's own rule (`engine.checkpoint_defaults`).
SCHEDULES = ("auto", "llada", "dream")
# Which rule commits a block's first position; "auto": Fast-dLLM's for Dream under its caches.
BLOCK_START_RULES = ("auto", "confidence", "first")
# The parameters that belong to one cache or unmask method: field -> (kind, method).
METHOD_FIELDS = {
    "dkv_refresh": ("cache", "dkv"),
    "dkv_window": ("cache", "dkv-greedy"),
    "dllm_prompt_refresh": ("cache", "dllm-cache"),
    "dllm_response_refresh": ("cache", "dllm-cache"),
    "dllm_rho": ("cache", "dllm-cache"),
    "freecache_window": ("cache", "freecache"),
    "guide_relative": ("unmask", "guided"),
    "alg_temp": ("unmask", "low_confidence"),
    "schedule_eps": ("schedule", "dream"),
}


class ParamError(ValueError):
    """A request parameter is invalid; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class EngineDefaults:
    """Server-wide defaults for the denoising fields a request may leave unset."""

    block_length: int = 32
    steps: int | None = None  # per block; None means one token per step
    cache: str = "none"
    unmask: str = "low_confidence"
    threshold: float = 0.9
    factor: float = 1.0
    confidence: str = "prob"
    dkv_refresh: int = 8
    dkv_window: int = 2
    dllm_prompt_refresh: int = 50
    dllm_response_refresh: int = 7
    dllm_rho: float = 0.25
    freecache_window: int = 1
    guide_relative: float = 0.5
    schedule: str = "auto"
    alg_temp: float = 0.0
    schedule_eps: float = 1e-3
    block_start: str = "auto"


@dataclass
class SamplingParams:
    """What one request asks for.

    `steps` counts denoising steps *per block* for the fixed-step policies
    (`low_confidence`, `random`); `None` means one token per step. Fields left
    `None` are filled from `EngineDefaults` by `resolve`.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    block_length: int | None = None
    steps: int | None = None
    cache: str | None = None
    unmask: str | None = None
    threshold: float | None = None
    factor: float | None = None
    confidence: str | None = None
    dkv_refresh: int | None = None  # dkv: full refresh every N steps of the request
    dkv_window: int | None = None  # dkv-greedy: neighbours of the block's masks also recomputed
    dllm_prompt_refresh: int | None = None  # dllm-cache: Kp, prompt recomputed every Kp steps
    dllm_response_refresh: int | None = None  # dllm-cache: Kr, response recomputed every Kr steps
    dllm_rho: float | None = None  # dllm-cache: fraction of response tokens V-verify recomputes per layer
    freecache_window: int | None = None  # freecache: masked blocks after the current one kept in attention
    guide_relative: float | None = None  # guided: accept a draft with p_guide >= this * p_guide(top-1)
    schedule: str | None = None  # tokens per step of low_confidence/random: llada (even) or dream (timesteps)
    alg_temp: float | None = None  # low_confidence: > 0 samples the committed positions from softmax(confidence / alg_temp)
    schedule_eps: float | None = None  # schedule=dream: the last timestep of linspace(1, eps, steps + 1)
    block_start: str | None = None  # first: a block's first position is committed alone at the block's first step
    stream_blocks: bool = False
    ignore_eos: bool = False  # run to max_tokens: end-of-text neither ends the request nor cuts its tokens

    def resolve(self, defaults: EngineDefaults) -> "SamplingParams":
        """Return a copy with every unset denoising field taken from `defaults`, validated."""
        filled = replace(
            self,
            stop=list(self.stop),
            block_length=_pick(self.block_length, defaults.block_length),
            steps=_pick(self.steps, defaults.steps),
            cache=_pick(self.cache, defaults.cache),
            unmask=_pick(self.unmask, defaults.unmask),
            threshold=_pick(self.threshold, defaults.threshold),
            factor=_pick(self.factor, defaults.factor),
            confidence=_pick(self.confidence, defaults.confidence),
            schedule=defaults.schedule if self.schedule in (None, "auto") else self.schedule,
            block_start=_pick(self.block_start, defaults.block_start),
            **{name: _pick(getattr(self, name), getattr(defaults, name)) for name in METHOD_FIELDS},
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

    def validate(self) -> None:
        """Raise `ParamError` naming the first invalid field."""
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", "stop must be a list of non-empty strings")
        _check_int("block_length", self.block_length, low=1)
        _check_choice("cache", self.cache, CACHE_POLICIES)
        _check_choice("unmask", self.unmask, UNMASK_POLICIES)
        _check_choice("confidence", self.confidence, CONFIDENCE_KINDS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("block_start", self.block_start, BLOCK_START_RULES)
        _check_float("alg_temp", self.alg_temp, low=0.0, high=100.0)
        _check_float("schedule_eps", self.schedule_eps, low=0.0, high=1.0, low_open=True)
        _check_float("threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        _check_float("factor", self.factor, low=0.0, high=1e6, low_open=True)
        for name in ("dkv_refresh", "dllm_prompt_refresh", "dllm_response_refresh"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("dkv_window", self.dkv_window, low=0)
        _check_int("freecache_window", self.freecache_window, low=0)
        _check_float("dllm_rho", self.dllm_rho, low=0.0, high=1.0)
        _check_float("guide_relative", self.guide_relative, low=0.0, high=1.0, low_open=True)
        for name in ("stream_blocks", "ignore_eos"):
            _check_bool(name, getattr(self, name))
        if self.steps is not None:
            _check_int("steps", self.steps, low=1)
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

    (`threshold` and `factor` predate this rule and stay lenient.)
    """
    for name, (kind, method) in METHOD_FIELDS.items():
        chosen = getattr(resolved, kind)
        if getattr(request, name) is not None and chosen != method:
            raise ParamError(name, f"{name} applies to {kind}={method!r}; this request uses {kind}={chosen!r}")


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ParamError(name, f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ParamError(name, f"{name} must be <= {high}, got {value}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ParamError(name, f"{name} must be true or false, got {value!r}")


def _check_float(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(name, f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ParamError(name, f"{name} must be in {bracket}{low}, {high}], got {value}")


def check_text(name: str, text: str) -> None:
    """Refuse text that is not valid Unicode.

    JSON escapes can carry lone surrogates (`"\\ud800"`): Python accepts them in a
    `str`, but no tokenizer can encode them, so they must be a 400, not a crash.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParamError(name, f"{name} is not valid Unicode: a lone surrogate at character {exc.start}") from None


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParamError(name, f"unknown {name} {value!r}; choose one of {', '.join(choices)}")

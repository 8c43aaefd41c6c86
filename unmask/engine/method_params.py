"""The cache and unmask methods' own parameters, each declared once.

One `MethodParam` line says a parameter's type, default, bounds, owning
method and help text. From this table come: the `SamplingParams` and
`EngineDefaults` fields (`add_method_fields`), their validation, the rule
that a method's parameter is refused on a request using another method, the
server's request fields with their OpenAPI ranges, and the CLI's
`--NAME` options. Adding a method parameter is one line here (and the policy
that reads it). Torch-free: the CLI parser and the protocol load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from unmask.engine.checks import check_float, check_int


@dataclass(frozen=True)
class MethodParam:
    name: str
    kind: type  # int or float
    default: int | float | None  # the engine default (`EngineDefaults`); None: off unless set
    owner: tuple[str, str]  # (the request field choosing the method, method): ("cache", "dkv"), ("schedule", "dream")
    help: str
    low: int | float | None = None
    high: int | float | None = None
    low_open: bool = False  # True: `low` itself is refused
    exclusive: bool = True  # refused on a request using another method (False: tolerated, as it always was)
    also: tuple[str, ...] = ()  # further methods of the owner's kind that read it too

    def check(self, value: Any) -> None:
        """Raise `ParamError` naming this parameter when `value` is not of its type and range (None: off, if the default is)."""
        if value is None and self.default is None:
            return
        if self.kind is int:
            check_int(self.name, value, self.low, self.high)
        else:
            check_float(self.name, value, self.low, self.high, self.low_open)

    def bounds(self) -> dict[str, int | float]:
        """The range as pydantic `Field` keywords (which /openapi.json states)."""
        out: dict[str, int | float] = {}
        if self.low is not None:
            out["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            out["le"] = self.high
        return out

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods that read it: the owner's, then `also`."""
        return (self.owner[1], *self.also)

    @property
    def applies_to(self) -> str:
        return f"{self.owner[0]}={'/'.join(self.methods)}"


METHOD_PARAMS: tuple[MethodParam, ...] = (
    MethodParam("threshold", float, 0.9, ("unmask", "threshold"),
                "commit every token whose confidence is at least it (joint_threshold: above it)",
                low=0.0, high=1.0, low_open=True, exclusive=False),
    MethodParam("edit_threshold", float, 1.0, ("unmask", "joint_threshold"),
                "rewrite a written token of the current block whose proposal differs with confidence above it "
                "(1: no editing)", low=0.0, high=1.0),
    MethodParam("max_post_edit_steps", int, 16, ("unmask", "joint_threshold"),
                "editing steps a block may take once nothing in it is masked", low=0, high=1024),
    MethodParam("factor", float, 1.0, ("unmask", "factor"), "factor f: commit the largest n with (n + 1)(1 - c_n) < f",
                low=0.0, high=1e6, low_open=True, exclusive=False),
    MethodParam("dkv_refresh", int, 8, ("cache", "dkv"), "full refresh every N steps of the request", low=1),
    MethodParam("dkv_window", int, 2, ("cache", "dkv-greedy"), "neighbours of the block's masks also recomputed", low=0),
    MethodParam("dllm_prompt_refresh", int, 50, ("cache", "dllm-cache"), "Kp: the prompt is recomputed every Kp steps", low=1),
    MethodParam("dllm_response_refresh", int, 7, ("cache", "dllm-cache"), "Kr: the response is recomputed every Kr steps",
                low=1),
    MethodParam("dllm_rho", float, 0.25, ("cache", "dllm-cache"),
                "fraction of the response V-verify recomputes per layer between refreshes", low=0.0, high=1.0),
    MethodParam("freecache_window", int, 1, ("cache", "freecache"), "masked blocks after the current one kept in attention",
                low=0),
    MethodParam("suffix_window", int, None, ("cache", "none"),
                "masked blocks after the current one that stay in attention; those beyond are neither computed nor "
                "attended (off: the whole canvas)", low=0, also=("prefix", "dual", "dkv", "dkv-greedy")),
    MethodParam("guide_relative", float, 0.5, ("unmask", "guided"),
                "accept a draft the guide gives at least this share of its top token's probability",
                low=0.0, high=1.0, low_open=True),
    MethodParam("alg_temp", float, 0.0, ("unmask", "low_confidence"),
                "Dream's alg_temp: > 0 draws the committed positions from softmax(confidence / alg_temp)",
                low=0.0, high=100.0),
    MethodParam("schedule_eps", float, 1e-3, ("schedule", "dream"),
                "Dream's eps, the last of the timesteps linspace(1, eps, steps + 1)", low=0.0, high=1.0, low_open=True),
)
METHOD_PARAMS_BY_NAME = {p.name: p for p in METHOD_PARAMS}
# The parameters refused on a request that uses another method: name -> (policy kind, the methods that read it).
METHOD_FIELDS = {p.name: (p.owner[0], p.methods) for p in METHOD_PARAMS if p.exclusive}

C = TypeVar("C", bound=type)


def add_method_fields(value: Callable[[MethodParam], Any]) -> Callable[[C], C]:
    """A class decorator (put it under `@dataclass`) that adds one field per method parameter, set to `value(param)`."""

    def add(cls: C) -> C:
        annotations = cls.__dict__.get("__annotations__", {})
        for p in METHOD_PARAMS:
            annotations[p.name] = f"{p.kind.__name__} | None"
            setattr(cls, p.name, value(p))
        cls.__annotations__ = annotations
        return cls

    return add

"""`ParamError` and the value checks that request and method parameters share (torch-free)."""

from __future__ import annotations

import math


class ParamError(ValueError):
    """A request parameter is invalid; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ParamError(name, f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ParamError(name, f"{name} must be <= {high}, got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ParamError(name, f"{name} must be true or false, got {value!r}")


def check_float(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(name, f"{name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ParamError(name, f"{name} must be in {bracket}{low}, {high}], got {value}")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParamError(name, f"unknown {name} {value!r}; choose one of {', '.join(choices)}")

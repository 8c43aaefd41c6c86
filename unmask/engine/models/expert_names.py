"""Checkpoint names of a routed layer's experts: every family names them `experts.{e}.{gate,up,down}_proj`."""

from __future__ import annotations

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def swiglu_names(ours: str, theirs: str) -> dict[str, str]:
    """Our SwiGLU's three weights under `ours` -> the checkpoint's under `theirs`."""
    return {f"{ours}.{p}.weight": f"{theirs}.{p}.weight" for p in PROJECTIONS}


def routed_expert_names(ours: str, theirs: str, num_experts: int) -> dict[str, str]:
    """`{ours}.experts.{e}.*` -> `{theirs}.experts.{e}.*` for every expert."""
    names: dict[str, str] = {}
    for e in range(num_experts):
        names |= swiglu_names(f"{ours}.experts.{e}", f"{theirs}.experts.{e}")
    return names

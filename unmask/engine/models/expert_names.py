"""Checkpoint names of a layer's feed-forward in the mixture-of-experts families.

Every family names a dense layer's SwiGLU `mlp.{gate,up,down}_proj`, the router
`mlp.gate` and the experts `mlp.experts.{e}.{gate,up,down}_proj`; they differ in
where the expert bias and the shared expert live.
"""

from __future__ import annotations

from unmask.engine.models.config import ModelConfig

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


def feed_forward_names(cfg: ModelConfig, layer: int, bias: str = "", shared: str = "") -> dict[str, str]:
    """Our names of layer `layer`'s feed-forward -> the checkpoint's: a dense layer's SwiGLU, or a routed
    layer's router, expert bias (at `bias`), experts and shared expert (at `shared`); `bias` and `shared`
    are relative to the checkpoint's layer (`model.layers.{layer}`)."""
    ours, theirs = f"layers.{layer}.mlp", f"model.layers.{layer}"
    moe = cfg.moe
    if moe is None or not cfg.is_moe_layer(layer):
        return swiglu_names(ours, f"{theirs}.mlp")
    names = {f"{ours}.gate.weight": f"{theirs}.mlp.gate.weight"}
    names |= routed_expert_names(ours, f"{theirs}.mlp", moe.num_experts)
    if moe.expert_bias:
        names[f"{ours}.gate.expert_bias"] = f"{theirs}.{bias}"
    if moe.shared_intermediate_size:
        names |= swiglu_names(f"{ours}.shared_expert", f"{theirs}.{shared}")
    return names

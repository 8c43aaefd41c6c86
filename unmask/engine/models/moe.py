"""The mixture-of-experts feed-forward (LLaDA-MoE, LLaDA2.x, SDAR-MoE): a router, routed experts, a shared expert.

The router picks each token's `top_k` experts and their weights as the
checkpoint's `MoEConfig` says (`route`); the experts' computation is one call
of `kernels.moe.moe_experts` over their stacked weights; the shared expert, if
any, is a SwiGLU every token goes through, added to the routed sum.

Weights: each expert is a `SwiGLU` whose linear layers carry the checkpoint's
per-expert tensor names (`mlp.experts.{e}.gate_proj.weight`, ...), so the
loader reads them unchanged. `fuse_projections` then stacks them into the
[E, 2 * I, D] (gate rows, then up rows) and [E, D, I] tensors the kernel reads
and makes the experts' parameters views of those (the pattern of
`swiglu.FusedRows`): the weights exist once, and loading into the
per-expert parameters fills the stacks.

Under tensor parallelism (`engine.parallel.layers`) every expert and the
shared expert hold a slice of their intermediate width; the router is
replicated; the routed and shared outputs are partial sums that `reduce`
(an all-reduce) adds up once per layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from unmask.engine.models.config import ModelConfig, MoEConfig
from unmask.engine.models.swiglu import SwiGLU
from unmask.kernels.moe import moe_experts

GROUP_SCORE_TOP = 2  # a group of experts is scored by the sum of its two best scores (LLaDA2's router)
NORMALIZE_EPS = 1e-20  # LLaDA2's guard against a zero sum; below float32 resolution for any real sum


def route(logits: torch.Tensor, moe: MoEConfig, expert_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int64 [T, K], topk_weights float32 [T, K]) from the router's logits [T, E]."""
    scores = logits.softmax(-1, dtype=torch.float32) if moe.scoring == "softmax" else logits.float().sigmoid()
    biased = scores if expert_bias is None else scores + expert_bias.float()
    eligible = _group_limited(biased, moe) if moe.num_groups > 1 else biased
    chosen, ids = eligible.topk(moe.top_k, dim=-1)
    weights = chosen if moe.expert_bias != "selection" else scores.gather(1, ids)
    if moe.normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + NORMALIZE_EPS)
    return ids, weights * moe.routed_scaling_factor


def _group_limited(scores: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """`scores` with every expert outside its token's best `top_groups` groups set to -inf."""
    t = scores.shape[0]
    grouped = scores.view(t, moe.num_groups, -1)
    group_scores = grouped.topk(min(GROUP_SCORE_TOP, grouped.shape[-1]), dim=-1).values.sum(-1)
    kept = torch.zeros_like(group_scores, dtype=torch.bool)
    kept.scatter_(1, group_scores.topk(moe.top_groups, dim=-1).indices, True)
    return grouped.masked_fill(~kept[:, :, None], float("-inf")).view(t, -1)


class Router(nn.Module):
    """The gate's linear layer [E, D] and, if the checkpoint has one, its per-expert bias (kept in float32)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size))
        self.expert_bias = nn.Parameter(torch.zeros(moe.num_experts)) if moe.expert_bias else None

    def keep_float32(self) -> None:
        """Put the float32 parts back in float32 after the model was cast to its serving dtype."""
        if self.moe.router_float32:
            self.weight = nn.Parameter(self.weight.detach().float(), requires_grad=False)
        if self.expert_bias is not None:
            self.expert_bias = nn.Parameter(self.expert_bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.moe.router_float32:
            return route(x.float() @ self.weight.float().T, self.moe, self.expert_bias)
        ids, weights = route(x @ self.weight.T.to(x.dtype), self.moe, self.expert_bias)
        # Routers run in the model's dtype cast their weights to it (LLaDA-MoE, Qwen3-MoE) before weighting.
        return ids, weights.to(x.dtype).float()


class MoEFeedForward(nn.Module):
    """Routed experts plus an optional shared expert, in place of a layer's dense SwiGLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        assert moe is not None, "a dense model has no MoE layers"
        d = cfg.hidden_size
        self.gate = Router(cfg, moe)
        self.experts = nn.ModuleList(SwiGLU(d, moe.expert_intermediate_size) for _ in range(moe.num_experts))
        self.shared_expert = SwiGLU(d, moe.shared_intermediate_size) if moe.shared_intermediate_size else None
        self.gate_up: torch.Tensor | None = None  # [E, 2 * I, D], set by `fuse_projections`
        self.down: torch.Tensor | None = None  # [E, D, I]
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _unchanged  # an all-reduce under tensor parallelism

    def fuse_projections(self) -> None:
        """Stack the experts' weights for the kernel (their parameters become views of the stacks) and
        the shared expert's gate/up as one GEMM."""
        self.gate.keep_float32()
        if self.shared_expert is not None:
            self.shared_expert.fuse_projections()
        with torch.no_grad():
            self.gate_up, self.down = self.stacked_weights()
        width = self.gate_up.shape[1] // 2
        for i, expert in enumerate(self.experts):
            expert.gate_proj.weight = nn.Parameter(self.gate_up[i, :width], requires_grad=False)
            expert.up_proj.weight = nn.Parameter(self.gate_up[i, width:], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(self.down[i], requires_grad=False)

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down): the fused stacks, or stacked now from unfused experts (training, references)."""
        if self.gate_up is not None and self.down is not None:
            return self.gate_up, self.down
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
        return gate_up, torch.stack([e.down_proj.weight for e in self.experts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        out = moe_experts(x, *self.stacked_weights(), ids, weights)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return self.reduce(out)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x

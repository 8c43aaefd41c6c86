"""The routed experts of a mixture-of-experts feed-forward: each token through its top-k SwiGLU experts, weighted.

Layout, shared by the model (`engine.models.moe`) and any kernel:

- x [T, D] the tokens; gate_up [E, 2 * I, D] each expert's gate rows then its up rows;
  down [E, D, I];
- topk_ids [T, K] int64 the experts of each token, topk_weights [T, K] float32 their
  weights (normalised and scaled by the router already).

out[t] = sum_k topk_weights[t, k] * down[e] @ silu(gate[e] @ x[t]) * (up[e] @ x[t]),
e = topk_ids[t, k]. Each expert's activations and output are in x's dtype, rounded
as a plain per-expert loop in that dtype rounds them; the weighted sum accumulates
in float32 and is cast to x's dtype at the end.
"""

from __future__ import annotations

import torch

from unmask.kernels.silu_mul import silu_mul_reference

__all__ = ["moe_experts", "moe_experts_reference"]


def moe_experts_reference(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Plain-PyTorch `moe_experts` (same promise): a loop over the experts that have tokens."""
    num_experts, k = gate_up.shape[0], topk_ids.shape[1]
    width = gate_up.shape[1] // 2
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # the (token, slot) pairs grouped by expert
    tokens, weights = order // k, topk_weights.reshape(-1)[order]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        gate_and_up = x.index_select(0, rows) @ gate_up[expert].T
        activated = silu_mul_reference(gate_and_up[:, :width], gate_and_up[:, width:])
        expert_out = activated @ down[expert].T
        out.index_add_(0, rows, expert_out.float() * weights[start : start + count, None])
        start += count
    return out.to(x.dtype)


def moe_experts(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """x [T, D] through each token's experts, weighted and summed -> [T, D] in x's dtype (layout above).

    Runs the PyTorch reference on every device.
    """
    return moe_experts_reference(x, gate_up, down, topk_ids, topk_weights)

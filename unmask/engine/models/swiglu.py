"""Stacked linear layers (`FusedRows`) and the SwiGLU feed-forward built on them.

Shared by the transformer's dense layers and the mixture-of-experts layers
(`models.moe`: its experts and shared expert are SwiGLUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unmask.kernels.silu_mul import silu_mul


@dataclass
class FusedRows:
    """Several linear layers on one input as one GEMM: their weights stacked row-wise in one tensor.

    At batch 1 a step is bound by reading the weights, and one wide GEMM reads them
    faster than two or three narrow ones (LLaDA-8B shapes on an H200: a batch-1
    dual step's GEMMs went from 4.75 to 4.06 ms). The layers' parameters
    become views of the stacked tensor, so the weights exist once and loading
    into the layers' parameters fills it.
    """

    weight: torch.Tensor  # [sum of out_features, in_features]
    bias: torch.Tensor | None
    sizes: list[int]  # out_features of each layer, in order

    @classmethod
    def of(cls, *linears: nn.Linear) -> FusedRows:
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in linears])
            has_bias = linears[0].bias is not None
            bias = torch.cat([layer.bias for layer in linears]) if has_bias else None
        sizes = [layer.out_features for layer in linears]
        for layer, w, b in zip(linears, weight.split(sizes), bias.split(sizes) if has_bias else [None] * len(sizes)):
            layer.weight = nn.Parameter(w, requires_grad=False)
            if b is not None:
                layer.bias = nn.Parameter(b, requires_grad=False)
        return cls(weight, bias, sizes)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's output: strided views of the one [T, sum of sizes] product."""
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), `width` wide: a dense layer's FFN, a routed expert or a shared expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.gate_up: FusedRows | None = None  # set by `fuse_projections`

    def fuse_projections(self) -> None:
        self.gate_up = FusedRows.of(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.gate_proj(x), self.up_proj(x)) if self.gate_up is None else self.gate_up(x)
        return self.down_proj(silu_mul(gate, up))

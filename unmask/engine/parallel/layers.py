"""The model split over the ranks of a tensor-parallel group (Megatron-style).

- q/k/v and gate/up are *column-parallel*: each rank holds a contiguous slice of
  the output features (its attention heads, its part of the FFN width), so the
  attention and the SwiGLU run on local data with no communication;
- o_proj and down_proj are *row-parallel*: each rank holds the matching slice
  of the input features and the partial products are summed (all-reduce);
- a mixture-of-experts layer splits every expert's FFN (and the shared
  expert's) the same way, gate/up by output and down by input features, with
  no communication inside; the router stays whole on every rank, so each rank
  routes identically, and the layer's routed and shared partial sums are
  all-reduced once (`MoEFeedForward.reduce`);
- the embedding and the LM head are *vocabulary-parallel*: each rank holds a
  slice of the token rows. An embedding lookup is an all-reduce of the rows a
  rank owns; the logits stay split, and `engine.parallel.vocab` reduces them.

`shard_model` rebuilds a `DiffusionTransformer` in place (on the meta device,
before any weight is read) into one rank's shard: same parameter names,
smaller shapes. Those shapes are all the loader needs to slice a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unmask.engine.models.config import ModelConfig
from unmask.engine.models.moe import MoEFeedForward
from unmask.engine.models.transformer import DiffusionTransformer
from unmask.engine.parallel.state import ParallelState


@dataclass(frozen=True)
class VocabShard:
    """The token rows [start, start + size) of one rank; the last rank's may run past the vocabulary (zero padding)."""

    start: int
    size: int
    vocab_size: int

    @classmethod
    def of(cls, vocab_size: int, rank: int, world_size: int) -> "VocabShard":
        size = -(-vocab_size // world_size)
        return cls(rank * size, size, vocab_size)

    @property
    def valid(self) -> int:
        """Rows that are real tokens (the rest is padding)."""
        return max(0, min(self.size, self.vocab_size - self.start))

    def local(self, token_id: int) -> int | None:
        """The row of a global token id in this shard, or None when another rank holds it."""
        row = token_id - self.start
        return row if 0 <= row < self.valid else None


class RowParallelLinear(nn.Linear):
    """A linear layer over this rank's slice of the input features; the outputs are summed over ranks."""

    def __init__(self, in_features: int, out_features: int, state: ParallelState):
        super().__init__(in_features, out_features, bias=False)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Module):
    """An embedding of this rank's token rows; tokens of other ranks contribute zeros to the sum."""

    def __init__(self, shard: VocabShard, hidden_size: int, state: ParallelState):
        super().__init__()
        self.shard, self.state = shard, state
        self.weight = nn.Parameter(torch.empty(shard.size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = input_ids - self.shard.start
        mine = (rows >= 0) & (rows < self.shard.size)
        out = F.embedding(rows.clamp(0, self.shard.size - 1), self.weight)
        return self.state.all_reduce(out.masked_fill(~mine[:, None], 0))


def check_divisible(cfg: ModelConfig, world_size: int) -> None:
    """Refuse a model whose heads or FFN width do not split evenly over `world_size` ranks."""
    sizes = {name: getattr(cfg, name) for name in ("num_heads", "num_kv_heads", "intermediate_size")}
    if cfg.moe is not None:
        sizes |= {name: getattr(cfg.moe, name) for name in ("expert_intermediate_size", "shared_intermediate_size")}
    for name, size in sizes.items():
        if size % world_size:
            raise ValueError(f"tensor_parallel_size {world_size} does not divide the model's {name} ({size})")


def shard_model(model: DiffusionTransformer, state: ParallelState) -> VocabShard:
    """Turn `model` into rank `state.rank`'s shard, in place; returns its vocabulary rows."""
    cfg, tp = model.cfg, state.world_size
    check_divisible(cfg, tp)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        attn.num_heads //= tp
        attn.num_kv_heads //= tp
        attn.q_proj, attn.k_proj, attn.v_proj = (_column(p, tp) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.o_proj = RowParallelLinear(attn.o_proj.in_features // tp, attn.o_proj.out_features, state)
        if isinstance(mlp, MoEFeedForward):
            _shard_experts(mlp, state)
            continue
        mlp.gate_proj, mlp.up_proj = _column(mlp.gate_proj, tp), _column(mlp.up_proj, tp)
        mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features // tp, mlp.down_proj.out_features, state)
    vocab = VocabShard.of(cfg.vocab_size, state.rank, tp)
    model.embed = VocabParallelEmbedding(vocab, cfg.hidden_size, state)
    # Column-parallel over the vocabulary: the logits stay split (see engine.parallel.vocab).
    model.lm_head = nn.Linear(cfg.hidden_size, vocab.size, bias=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return vocab


def _shard_experts(mlp: MoEFeedForward, state: ParallelState) -> None:
    """Each expert's (and the shared expert's) slice of the FFN width; one all-reduce for the whole layer."""
    tp = state.world_size
    for expert in [*mlp.experts, *([mlp.shared_expert] if mlp.shared_expert is not None else [])]:
        expert.gate_proj, expert.up_proj = _column(expert.gate_proj, tp), _column(expert.up_proj, tp)
        down = expert.down_proj
        expert.down_proj = nn.Linear(down.in_features // tp, down.out_features, bias=False)  # summed by `reduce`
    mlp.reduce = state.all_reduce


def _column(linear: nn.Linear, tp: int) -> nn.Linear:
    """This rank's slice of a linear layer's output features (no communication)."""
    return nn.Linear(linear.in_features, linear.out_features // tp, bias=linear.bias is not None)

"""The paged attention backend the model calls in every layer.

Fresh K/V of the active positions are written into each sequence's pages,
then every active query attends over all of its own sequence's pages (for a
block-causal model, over those of its own block and the blocks before it). The
kernels (Triton on CUDA, plain PyTorch elsewhere) live in `kernels/`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.engine.kv_pool import KVPool
from unmask.kernels.kv_write import write_kv
from unmask.kernels.paged_attention import paged_attention


@dataclass
class PackedBatch:
    """Index tensors describing one packed step of S sequences and T active tokens (on the model's device)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position of each token within its sequence
    slot_mapping: torch.Tensor  # [T] int64 flat KV slot of each token
    cu_seqlens_q: torch.Tensor  # [S + 1] int32 query offsets
    seq_lens: torch.Tensor  # [S] int32 key count (whole sequence length)
    page_table: torch.Tensor  # [S, max_pages] int32


class PagedAttention:
    """`AttentionBackend` over the KV pool for one packed batch."""

    def __init__(self, pool: KVPool, batch: PackedBatch, head_dim: int, block_causal_size: int | None = None):
        self.pool, self.batch = pool, batch
        self.scale = head_dim**-0.5
        self.block_causal_size = block_causal_size  # None: bidirectional

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        b = self.batch
        write_kv(k, v, k_cache, v_cache, b.slot_mapping)
        return paged_attention(
            q, k_cache, v_cache, b.cu_seqlens_q, b.seq_lens, b.page_table, self.scale,
            query_positions=b.positions if self.block_causal_size else None,
            block_causal_size=self.block_causal_size,
        )

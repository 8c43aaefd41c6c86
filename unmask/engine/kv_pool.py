"""The paged KV cache's tensors and slot arithmetic (which pages are free is `engine.pages`).

Every layer's K and V live in one tensor each, [layers, pages, page_size,
kv_heads, head_dim]. A sequence owns the pages listed in its page table;
position p lives in page `pages[p // page_size]` at slot `p % page_size`.

With `features=True` the pool also holds, per layer and slot, a token's
attention output and FFN output ([layers, pages, page_size, hidden] each),
addressed by the same slots: dLLM-Cache reuses them for the tokens it does not
recompute. They are allocated only when asked for, since they can outweigh
the K/V (8x for a GQA model like Dream).
"""

from __future__ import annotations

import torch

from unmask.engine.models.config import ModelConfig


class KVPool:
    def __init__(
        self,
        cfg: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        features: bool = False,
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"the KV pool needs at least one page of one slot, got {num_pages} x {page_size}")
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        feature_shape = (cfg.num_layers, num_pages, page_size, cfg.hidden_size)
        self.attn_out = torch.zeros(feature_shape, dtype=dtype, device=device) if features else None
        self.mlp_out = torch.zeros(feature_shape, dtype=dtype, device=device) if features else None
        self.page_size = page_size
        self.num_pages = num_pages

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: torch.dtype, features: bool = False) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        width = cfg.num_kv_heads * cfg.head_dim + (cfg.hidden_size if features else 0)
        return 2 * cfg.num_layers * page_size * width * element

    @classmethod
    def from_budget(
        cls,
        cfg: ModelConfig,
        memory_bytes: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        features: bool = False,
    ) -> "KVPool":
        """The largest pool that fits in `memory_bytes`."""
        pages = memory_bytes // cls.bytes_per_page(cfg, page_size, dtype, features)
        if pages < 1:
            raise ValueError(f"a KV cache budget of {memory_bytes} bytes holds no page of {page_size} tokens")
        return cls(cfg, int(pages), page_size, dtype, device, features)

    @property
    def has_features(self) -> bool:
        return self.attn_out is not None

    def slots_in_table(self, page_table: torch.Tensor, owner: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index (page * page_size + offset) of each position; `owner` names its row of `page_table`."""
        pages = page_table[owner, positions // self.page_size].long()
        return pages * self.page_size + positions % self.page_size

"""Cache policies: which positions of a sequence are recomputed at a step (DESIGN.md §2).

Every position that is not active keeps the K/V last written to its pages.
A policy only returns positions; the runner and the KV pool do the rest.
"""

from __future__ import annotations

import torch

from engine.sequence import Sequence


class CachePolicy:
    """Base: recompute everything (the reference, `none`)."""

    name = "none"

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        """Sorted absolute positions whose K/V (and hidden states) are recomputed this step."""
        return torch.arange(seq.length)

    def is_refresh(self, seq: Sequence) -> bool:
        """True when this step recomputes the whole sequence."""
        return True


class PrefixCache(CachePolicy):
    """Fast-dLLM prefix cache: full refresh at each block start, then [block start, end)."""

    name = "prefix"

    def is_refresh(self, seq: Sequence) -> bool:
        return seq.step == 0

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        if self.is_refresh(seq):
            return torch.arange(seq.length)
        start, _ = seq.block_bounds()
        return torch.arange(start, seq.length)


class DualCache(PrefixCache):
    """Fast-dLLM dual cache: full refresh at each block start, then the current block only."""

    name = "dual"

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        if self.is_refresh(seq):
            return torch.arange(seq.length)
        start, end = seq.block_bounds()
        return torch.arange(start, end)


CACHE_POLICIES: dict[str, CachePolicy] = {p.name: p for p in (CachePolicy(), PrefixCache(), DualCache())}

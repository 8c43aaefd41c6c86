"""FreeCache (FlashDLM, arXiv 2505.21467): reuse the K/V of the stable clean region.

The rule, per step of a block b of length B (window w = `freecache_window`):

- keys reach the end of block b + w, so the masked blocks beyond the window
  are dropped from attention altogether (they carry little but a length bias);
- recomputed: the current block and the w masked blocks after it (the
  working region); the clean tokens left of it are frozen and reuse their K/V;
- the request's first step computes the prompt and the working region; the
  first step of each later block also recomputes block b - 1 once, so the
  tokens committed at that block's last step enter the cache with their
  final K/V (the paper's reference code freezes them as they were before
  their commit; one extra block per block avoids that at small cost).

With a window that covers the canvas, this is the prefix cache without the
per-block full refresh: only the just-finished block is refreshed.
"""

from __future__ import annotations

import torch

from unmask.engine.policies.cache import CachePolicy
from unmask.engine.sequence import Sequence


class FreeCache(CachePolicy):
    name = "freecache"
    full_attention_only = True
    reads_suffix_window = False
    infills = False  # its window drops the far part of the sequence from attention, an infill suffix too

    def is_refresh(self, seq: Sequence) -> bool:
        return seq.steps_taken == 0

    def key_length(self, seq: Sequence) -> int:
        assert seq.params.freecache_window is not None
        _, end = seq.block_bounds()
        return min(seq.length, end + seq.params.freecache_window * seq.block_size)

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        if self.is_refresh(seq):
            start = 0
        elif seq.step == 0:
            start, _ = seq.block_bounds(seq.block - 1)
        else:
            start, _ = seq.block_bounds()
        return torch.arange(start, self.key_length(seq))

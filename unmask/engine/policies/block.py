"""Cache policies of block-causal models (SDAR, Fast-dLLM v2): attention never looks at a later block.

A committed block's K/V depend only on itself and the blocks before it, so
once they are computed with the block's final tokens they are exact for the
rest of the request: nothing is ever refreshed. Keys end at the current
block's end (`key_length`), so the masked blocks after it are neither
computed nor attended to.

`block` (the exact block KV cache, the default for these models):

- the request's first step computes everything up to the current block's end
  (the prompt, whose last block the current one shares);
- the first step of each later block also recomputes the previous block once,
  with its final tokens, so its K/V enter the cache exact (SDAR's reference
  decoding runs that pass on its own when a block completes);
- every other step recomputes the current block, whose positions see each other.

For a model that predicts a block's first token from the previous block's last
output (`Sequence.entering_block`, Fast-dLLM v2), that step recomputes the
previous block alone, keys ending where the new block starts, and commits
just that token; the block's denoising steps follow.

`block-dual` (Fast-dLLM v2's block cache, its `use_block_cache`): as `block`,
but inside a block the positions outside the current sub-block keep their K/V
from the last step that recomputed the whole block, which is every step until
the sub-block's first token is committed.
"""

from __future__ import annotations

import torch

from unmask.engine.policies.cache import CachePolicy
from unmask.engine.sequence import Sequence


class BlockCache(CachePolicy):
    name = "block"
    block_causal_only = True
    reads_suffix_window = False
    keeps_edits = True  # the current block at every step; a block is final when the next one starts

    def is_refresh(self, seq: Sequence) -> bool:
        return seq.steps_taken == 0

    def key_length(self, seq: Sequence) -> int:
        start, end = seq.block_bounds()
        return start if seq.entering_block() else end

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        return torch.arange(self._first_recomputed(seq), self.key_length(seq))

    @staticmethod
    def _first_recomputed(seq: Sequence) -> int:
        assert seq.layout is not None
        start, _ = seq.block_bounds()
        block_start = seq.layout.block_start(start)
        if seq.steps_taken == 0:
            return 0
        if seq.step == 0 and block_start > 0:
            return block_start - seq.block_size  # the previous block, with its final tokens
        return block_start


class BlockDualCache(BlockCache):
    name = "block-dual"

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        assert seq.layout is not None
        sub = seq.layout.sub_block_size
        if sub is None or seq.entering_block() or seq.step <= _entry_steps(seq):
            return super().active_positions(seq)  # the block's first denoising step computes it whole
        sub_start = int(seq.masked_in_block()[0]) // sub * sub
        if int(seq.tokens[sub_start]) == seq.mask_id:
            return super().active_positions(seq)  # the whole block, its K/V kept for the sub-block's next steps
        return torch.arange(sub_start, sub_start + sub)


def _entry_steps(seq: Sequence) -> int:
    """Steps of the current block spent before its denoising: 1 if its first token was predicted alone, else 0."""
    assert seq.layout is not None
    start, _ = seq.block_bounds()
    return int(seq.layout.first_token_alone and start % seq.block_size == 0)

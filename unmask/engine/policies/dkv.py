"""dKV-Cache (arXiv 2505.15781): delayed caching of decoded tokens.

A token's K/V swing on the step it is decoded and then settle. So a committed
token enters the cache one step *after* its commit: the step that follows
recomputes it with its token in place, and later steps reuse its K/V. Masked
tokens, whose representations keep moving, are recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmask.engine.policies.cache import CachePolicy
from unmask.engine.sequence import Sequence


class DKVDecode(CachePolicy):
    """dKV-Cache-Decode: every masked position of the canvas and last step's commits; all every `dkv_refresh` steps.

    Between refreshes the prompt and the tokens committed two or more steps
    ago reuse their K/V.
    """

    name = "dkv"
    full_attention_only = True

    def is_refresh(self, seq: Sequence) -> bool:
        assert seq.params.dkv_refresh is not None
        return seq.steps_taken % seq.params.dkv_refresh == 0

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        end = self.attended_end(seq)
        if self.is_refresh(seq):
            return torch.arange(end)
        masked = torch.nonzero(seq.tokens[:end] == seq.mask_id).flatten()
        return torch.unique(torch.cat([masked, seq.last_committed]))


class DKVGreedy(CachePolicy):
    """dKV-Cache-Greedy: the block's masks, their `dkv_window` neighbours and last step's commits.

    The request's first step computes everything; each later block starts by
    recomputing the response (the prompt stays cached after the first step).
    Faster than `dkv` and less exact: masked positions outside the window,
    in later blocks, keep the K/V of the block start.
    """

    name = "dkv-greedy"
    full_attention_only = True

    def is_refresh(self, seq: Sequence) -> bool:
        return seq.steps_taken == 0

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        end = self.attended_end(seq)
        if self.is_refresh(seq):
            return torch.arange(end)
        if seq.step == 0:
            return torch.arange(seq.prompt_len, end)
        assert seq.params.dkv_window is not None
        near = _within(seq.masked_in_block(), seq.params.dkv_window, end)
        near = near[near >= seq.prompt_len]
        return torch.unique(torch.cat([near, seq.last_committed]))


def _within(positions: torch.Tensor, window: int, length: int) -> torch.Tensor:
    """Sorted positions in [0, length) at distance <= window of any of `positions`."""
    marked = torch.zeros(1, 1, length)
    marked[0, 0, positions] = 1.0
    spread = F.max_pool1d(marked, kernel_size=2 * window + 1, stride=1, padding=window)
    return torch.nonzero(spread.flatten()).flatten()

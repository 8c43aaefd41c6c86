"""Cache policies: which positions of a sequence are recomputed at a step.

Every position that is not active keeps the K/V last written to its pages.
A policy only returns positions; the runner and the KV pool do the rest.
Two optional answers extend the mechanism: how far the keys reach
(`key_length`, for methods that drop the far masked suffix from attention:
FreeCache's window, and the suffix window of `policies.suffix_window` that
the policies here and dKV-Cache's read),
and per-layer feature reuse (`features`, for dLLM-Cache). Schedules count
the sequence's own clock, `seq.steps_taken`. A policy lists what it cannot
run without in `requirements` (`policies.resources`), and whether it keeps
fixed text after the canvas in attention (`infills`).
"""

from __future__ import annotations

import torch

from unmask.engine.feature_cache import FeatureUse
from unmask.engine.policies.resources import Requirement
from unmask.engine.policies.suffix_window import suffix_window_end
from unmask.engine.sequence import Sequence


class CachePolicy:
    """Base: recompute everything (the reference, `none`)."""

    name = "none"
    requirements: tuple[Requirement, ...] = ()
    # Which attention patterns the policy is right for: approximations of full attention have
    # nothing to approximate in a block-causal model, and the block caches assume one.
    full_attention_only = False
    block_causal_only = False
    infills = True  # False: it assumes the canvas ends the sequence (infill requests with fixed text are refused)
    reads_suffix_window = True  # it stops at `suffix_window` (the method table lists exactly these policies)
    # True: every step recomputes the whole current block and earlier blocks are final where it reuses their
    # K/V, so an unmask policy may rewrite the current block's written tokens (`UnmaskPolicy.edits`).
    # A subclass is False unless it says so itself (`__init_subclass__`): a new cache is not assumed to fit.
    keeps_edits = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.keeps_edits = cls.__dict__.get("keeps_edits", False)

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        """Sorted absolute positions whose K/V (and hidden states) are recomputed this step."""
        return torch.arange(self.attended_end(seq))

    def is_refresh(self, seq: Sequence) -> bool:
        """True when this step recomputes everything the sequence attends to."""
        return True

    def attended_end(self, seq: Sequence) -> int:
        """End of the positions this step attends to: the suffix window's, else the sequence's."""
        return suffix_window_end(seq) if self.reads_suffix_window else seq.length

    def key_length(self, seq: Sequence) -> int | None:
        """Queries attend to positions [0, key_length); None: the whole sequence."""
        end = self.attended_end(seq)
        return None if end == seq.length else end

    def features(self, seq: Sequence) -> FeatureUse | None:
        """Per-layer feature reuse this step; None: every active position is recomputed."""
        return None


class PrefixCache(CachePolicy):
    """Fast-dLLM prefix cache: full refresh at each block start, then [block start, end)."""

    name = "prefix"
    full_attention_only = True
    keeps_edits = True  # refreshed at each block start; the current block is recomputed at every step

    def is_refresh(self, seq: Sequence) -> bool:
        return seq.step == 0

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        if self.is_refresh(seq):
            return torch.arange(self.attended_end(seq))
        start, _ = seq.block_bounds()
        return torch.arange(start, self.attended_end(seq))


class DualCache(PrefixCache):
    """Fast-dLLM dual cache: full refresh at each block start, then the current block only."""

    name = "dual"
    keeps_edits = True  # as prefix

    def active_positions(self, seq: Sequence) -> torch.Tensor:
        if self.is_refresh(seq):
            return torch.arange(self.attended_end(seq))
        start, end = seq.block_bounds()
        return torch.arange(start, end)


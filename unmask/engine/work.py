"""A sequence's work at one step, as its cache policy answers it: what the plan is made of.

The scheduler plans a step from these (reading each one's `cost`), the runner
executes them (`positions`, `logit_positions`, `key_length`, `features`), and
the commit writes the chosen proposals at `targets`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.engine.feature_cache import FeatureUse
from unmask.engine.policies import CACHE_POLICIES
from unmask.engine.sampling import RowLogprobs
from unmask.engine.sequence import Sequence


@dataclass
class SequenceWork:
    """What one sequence needs from a step."""

    seq: Sequence
    positions: torch.Tensor  # sorted absolute positions to recompute (CPU, int64)
    logit_positions: torch.Tensor  # positions whose output rows feed the logits; a subset of `positions`
    key_length: int | None = None  # keys attended are positions [0, key_length); None: the whole sequence
    features: FeatureUse | None = None  # per-layer feature reuse (dLLM-Cache); None: recompute all `positions`
    targets: torch.Tensor | None = None  # the positions the logits propose for (`Sequence.proposal_targets`); None: logit_positions
    row_logprobs: RowLogprobs | None = None  # set by the proposal when the request asks for logprobs

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = self.logit_positions

    @property
    def cost(self) -> int:
        """Positions packed into the step (the scheduler's token budget counts these)."""
        return self.positions.numel()

    @property
    def recomputed(self) -> int:
        """Positions each layer recomputes."""
        n = self.positions.numel()
        return n if self.features is None else self.features.recomputed(n)


def plan_work(seq: Sequence, logits_shift: int) -> SequenceWork:
    """The sequence's work at this step: its policy's active positions plus what its logits need.

    With `logits_shift` (Dream) the logit of position i is read from output i - shift,
    so those positions enter the forward too.
    """
    targets = seq.proposal_targets()
    sources = targets - logits_shift
    policy = CACHE_POLICIES[seq.params.cache]
    positions = policy.active_positions(seq)
    if logits_shift:
        positions = torch.unique(torch.cat([positions, sources]))
    return SequenceWork(seq, positions, sources, policy.key_length(seq), policy.features(seq), targets)

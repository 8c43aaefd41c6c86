"""Fast-dLLM's block-start rule for Dream under its caches (`block_start=first`).

Fast-dLLM's Dream code runs the whole sequence once at a block's first step
(refreshing its caches) and, from that pass's shifted logits, commits the
block's first position, alone and unconditionally: the logit that predicts it
sits at the position before the block, which the later block-only passes no
longer compute. The following steps apply the unmask policy to the rest of the
block. Unmask's default elsewhere (`confidence`) lets the policy choose at every
step and recomputes the position before the block whenever it is needed.
"""

from __future__ import annotations

import torch

from unmask.engine.sequence import Sequence


def block_start_commit(seq: Sequence, targets: torch.Tensor) -> torch.Tensor | None:
    """Indices into `targets` (the block's masked positions) this rule commits, or None where it does not apply."""
    if seq.params.block_start != "first" or seq.step != 0 or targets.numel() == 0:
        return None
    start, _ = seq.block_bounds()
    if int(targets[0]) != start:  # the block's first position is already written (a fixed infill token)
        return None
    return torch.zeros(1, dtype=torch.long)

"""Guided Diffusion (FlashDLM, arXiv 2505.21467) as an unmask policy.

The engine runs the guide model over every guided sequence's drafts once per
step (`engine.guide.GuideRunner.verify`, batched); this policy turns the
guide's verdict into commits: the leading run of drafts the guide agreed
with and, where it rejected one, the next position (the engine has put the
guide's own token there), so a block is written left to right and every
step commits something.
"""

from __future__ import annotations

import torch

from unmask.engine.guide import guide_state
from unmask.engine.policies.unmask import UnmaskPolicy
from unmask.engine.sequence import Sequence


class Guided(UnmaskPolicy):
    name = "guided"

    def choose(self, seq: Sequence, confidence: torch.Tensor) -> torch.Tensor:
        agreed = guide_state(seq).agreed
        if agreed is None:
            raise RuntimeError("the guide model did not check this step's proposals")
        corrected = guide_state(seq).correction is not None
        return torch.arange(min(agreed + corrected, confidence.numel()))

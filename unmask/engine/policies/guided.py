"""Guided Diffusion (FlashDLM, arXiv 2505.21467) as an unmask policy.

The policy needs a guide model (`policies.guide`). Before a step commits,
`prepare` runs the guide once over every guided sequence's drafts (batched)
and puts the guide's own token where it rejected a draft; `choose` then
commits the leading run of drafts the guide agreed with and, where it
rejected one, the next position (the guide's token), so a block is written
left to right and every step commits something.
"""

from __future__ import annotations

import torch

from unmask.engine.policies.guide import GuideState, guide_state
from unmask.engine.policies.resources import GUIDE_MODEL, PolicyResources
from unmask.engine.policies.unmask import Drafts, UnmaskPolicy
from unmask.engine.sequence import Sequence


class Guided(UnmaskPolicy):
    name = "guided"
    requirements = (GUIDE_MODEL,)
    prepares = True
    keeps_proposals = False  # the guide's token replaces a rejected draft
    infills = False  # the guide reads the canvas left to right, without the text after it
    allows_block_start = False  # the guide checks every commit of a block, its first included

    def new_state(self) -> GuideState:
        return GuideState()

    def prepare(self, drafts: Drafts, resources: PolicyResources) -> None:
        assert resources.guide is not None  # guided requests are refused without one
        resources.guide.verify(drafts)
        for seq, tokens in drafts:
            state = guide_state(seq)
            if state.correction is not None:
                tokens[state.agreed] = state.correction

    def choose(self, seq: Sequence, confidence: torch.Tensor) -> torch.Tensor:
        agreed = guide_state(seq).agreed
        if agreed is None:
            raise RuntimeError("the guide model did not check this step's proposals")
        corrected = guide_state(seq).correction is not None
        return torch.arange(min(agreed + corrected, confidence.numel()))

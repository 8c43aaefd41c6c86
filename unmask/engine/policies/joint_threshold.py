"""LLaDA2.x's commit rule (`unmask=joint_threshold`), with LLaDA2.1's token editing.

Mask to token, at every step of a block (LLaDA2.0's `generate`): the masked
positions whose confidence is strictly above `threshold` are committed if
there are at least k of them, else the k most confident masked positions,
k being the even split of the whole block over `steps` at this step (1 when
`steps` is unset, as in the reference's defaults) and at most what is masked.

Token to token (LLaDA2.1, SGLang's `JointThreshold`), when `edit_threshold` is
below 1: at the same steps, every position of the current block the model
has already written (never the prompt) whose proposed token differs from the
written one and whose confidence is strictly above `edit_threshold` is
rewritten. The block stays current after its last mask is filled: it ends
after a step that began with nothing masked and rewrote nothing, or after
`max_post_edit_steps` such steps (`Sequence._block_ends`). Tokens of earlier
blocks are final. At `edit_threshold` 1 (the default) no probability is
above it, so the rule is LLaDA2.0's and a block ends with its last mask.

Editing needs every position the step rewrites to be recomputed at the next
step and earlier blocks to be final where the cache reuses them: caches that
say `keeps_edits` (they recompute the whole current block at every step), on
models that denoise whole blocks (no sub-blocks, no first token written alone).
"""

from __future__ import annotations

import torch

from unmask.engine.params import ParamError, SamplingParams
from unmask.engine.policies.cache import CachePolicy
from unmask.engine.policies.unmask import UnmaskPolicy, even_schedule
from unmask.engine.sequence import BlockLayout, Sequence

NO_EDITING = 1.0  # a probability is never above it


class JointThreshold(UnmaskPolicy):
    name = "joint_threshold"
    allows_block_start = False  # the reference commits by its own rule at every step

    def edits(self, params: SamplingParams) -> bool:
        assert params.edit_threshold is not None
        return params.edit_threshold < NO_EDITING

    def choose(self, seq: Sequence, confidence: torch.Tensor) -> torch.Tensor:
        """Mask to token: those above `threshold` if at least k, else the k most confident (`least_commits`)."""
        k = min(least_commits(seq), confidence.numel())
        above = torch.nonzero(confidence > seq.params.threshold).flatten()
        return above if above.numel() >= k else torch.topk(confidence, k).indices

    def select(self, seq: Sequence, targets: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """`choose` among the masked targets, and with `editing` the edits among the written ones."""
        current = seq.tokens[targets]
        written = current != seq.mask_id
        masked = torch.nonzero(~written).flatten()
        chosen = masked[self.choose(seq, confidence[masked])] if masked.numel() else masked
        if not seq.editing:
            return chosen
        changed = written & (tokens != current) & (confidence > seq.params.edit_threshold)
        return torch.sort(torch.cat([chosen, torch.nonzero(changed).flatten()])).values


def least_commits(seq: Sequence) -> int:
    """LLaDA2.0's per-step minimum: the even split of the whole block over `steps`, 1 when unset or past them."""
    steps = seq.params.steps
    if steps is None or seq.step >= steps:
        return 1
    return even_schedule(seq.block_size, steps)[seq.step]


def check_edit_fit(params: SamplingParams, cache: CachePolicy, layout: BlockLayout | None) -> None:
    """Refuse editing where a rewritten token would not be seen as written: a cache that keeps stale K/V
    inside the block, or a model that denoises sub-blocks or writes a block's first token alone."""
    if not cache.keeps_edits:
        raise ParamError(
            "edit_threshold",
            f"token editing (edit_threshold < 1) needs a cache that recomputes the whole current block at every step "
            f"(none, prefix, dual, block); cache={cache.name!r} keeps K/V of tokens an edit may rewrite",
        )
    if layout is not None and (layout.sub_block_size is not None or layout.first_token_alone):
        raise ParamError(
            "edit_threshold",
            "token editing (edit_threshold < 1) needs a model that denoises whole blocks; this one denoises "
            "sub-blocks and writes each block's first token alone",
        )

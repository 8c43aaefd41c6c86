"""Unmask policies: how many of the current block's masked tokens a step commits, and which.

A policy sees the confidences of the block's still-masked positions (in
position order) and returns the indices (into that list) to commit. A block
always finishes: the threshold-like policies commit at least one token per
step, and the fixed-step policies commit everything left at their last step
(Dream's schedule may commit none at a step before that).

A policy may also keep per-request state (`new_state`, stored on the
sequence as `unmask_state`), look at every one of its sequences' proposals in
one batched call before the step commits (`prepare`), and list the engine
resources it cannot run without (`requirements`, `policies.resources`). One
whose `prepare` may replace proposed tokens says so (`keeps_proposals`), and
its requests cannot have commit-time logprobs. It also says whether it can
write around fixed text (`infills`: an infill request's suffix or pieces
between spans) and whether it lets the block-start rule commit a block's first
position for it (`allows_block_start`). One that may rewrite the current
block's written tokens says so for a request (`edits`): its steps then propose
for those positions too (`Sequence.proposal_targets`) and it picks among all
of them (`select`).
"""

from __future__ import annotations

import torch

from unmask.engine.params import SamplingParams
from unmask.engine.policies.dream_schedule import dream_transfer_count
from unmask.engine.policies.resources import PolicyResources, Requirement
from unmask.engine.sequence import Sequence, UnmaskState

Drafts = list[tuple[Sequence, torch.Tensor]]  # each sequence with its step's proposed tokens (in place)


def even_schedule(block_tokens: int, steps: int) -> list[int]:
    """LLaDA's schedule: spread a block's tokens over its steps, earlier steps taking the remainder."""
    base, extra = divmod(block_tokens, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


class UnmaskPolicy:
    name = ""
    random_confidence = False  # rank by uniform noise instead of model confidence
    requirements: tuple[Requirement, ...] = ()
    prepares = False  # True: `prepare` runs at every step this policy's sequences take part in
    # False: `prepare` may replace a proposed token, so the proposal's logprobs would not describe
    # the committed token; requests for logprobs are refused.
    keeps_proposals = True
    infills = True  # False: it assumes the canvas ends the sequence (infill requests with fixed text are refused)
    allows_block_start = True  # False: it must choose every commit itself (block_start='first' is refused)

    def new_state(self) -> UnmaskState | None:
        """A new request's own state (None: the policy keeps none)."""
        return None

    def prepare(self, drafts: Drafts, resources: PolicyResources) -> None:
        """Before the commits: one batched look at the proposals of all this policy's sequences of a step.

        It may change a proposed token in place. If it raises, its sequences fail in `choose`
        (the others of the step go on).
        """

    def edits(self, params: SamplingParams) -> bool:
        """The request's steps may rewrite written tokens of the current block (`Sequence.editing`)."""
        return False

    def choose(self, seq: Sequence, confidence: torch.Tensor) -> torch.Tensor:
        """Indices into `confidence` (the block's masked positions) to commit this step."""
        raise NotImplementedError

    def select(self, seq: Sequence, targets: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """Indices into `targets` (`Sequence.proposal_targets`, with their proposed `tokens`) to write this step.

        Without editing the targets are the block's masked positions and this is `choose`.
        """
        return self.choose(seq, confidence)

    def fewest_steps(self, params: SamplingParams) -> int:
        """A lower bound on the steps this policy takes to fill the whole canvas: one per block."""
        return -(-params.max_tokens // params.block_size)


class LowConfidence(UnmaskPolicy):
    """Commit the k most confident tokens, k from the request's schedule (LLaDA's even one, or Dream's).

    With `alg_temp` > 0 the k positions are drawn without replacement from
    softmax(confidence / alg_temp) instead (Dream's `alg_temp`), from the request's generator.
    """

    name = "low_confidence"

    def choose(self, seq: Sequence, confidence: torch.Tensor) -> torch.Tensor:
        k = min(scheduled_count(seq, confidence.numel()), confidence.numel())
        if k == 0:
            return torch.empty(0, dtype=torch.long)
        if seq.params.alg_temp:
            weights = torch.softmax(confidence.double() / seq.params.alg_temp, dim=0)
            return torch.multinomial(weights, k, replacement=False, generator=seq.generator)
        return torch.topk(confidence, k).indices

    def fewest_steps(self, params: SamplingParams) -> int:
        """Exactly the schedule's steps over a canvas of masks: each block takes its `SamplingParams.steps_for_block`."""
        full, last = divmod(params.max_tokens, params.block_size)
        return full * params.steps_for_block(params.block_size) + (params.steps_for_block(last) if last else 0)


def scheduled_count(seq: Sequence, masked: int) -> int:
    """Tokens the fixed-step schedule commits at the current step, `masked` of the block's tokens being left."""
    steps = seq.steps_in_block()
    if seq.step >= steps - 1:
        return masked  # the last step (or a step past it, after block_start's extra commit) finishes the block
    if seq.params.schedule == "dream":
        assert seq.params.schedule_eps is not None
        return dream_transfer_count(masked, seq.step, steps, seq.params.schedule_eps)
    # LLaDA's schedule is fixed at the block's start, from the tokens it had to write then.
    return max(1, even_schedule(seq.block_masks(), steps)[seq.step])


class RandomOrder(LowConfidence):
    """LLaDA's `random` remasking: the even schedule, positions picked uniformly at random."""

    name = "random"
    random_confidence = True


class Threshold(UnmaskPolicy):
    """Fast-dLLM: commit every token with confidence >= tau (as its reference), at least the most confident one."""

    name = "threshold"

    def choose(self, seq: Sequence, confidence: torch.Tensor) -> torch.Tensor:
        chosen = torch.nonzero(confidence >= seq.params.threshold).flatten()
        return chosen if chosen.numel() else confidence.argmax().view(1)


class Factor(UnmaskPolicy):
    """Fast-dLLM: with c_1 >= c_2 >= ..., commit the largest n with (n + 1)(1 - c_n) < f (at least 1)."""

    name = "factor"

    def choose(self, seq: Sequence, confidence: torch.Tensor) -> torch.Tensor:
        ordered, order = torch.sort(confidence, descending=True)
        n = torch.arange(1, ordered.numel() + 1, dtype=ordered.dtype)
        ok = torch.nonzero((n + 1) * (1 - ordered) < seq.params.factor).flatten()
        count = int(ok.max()) + 1 if ok.numel() else 1
        return order[:count]


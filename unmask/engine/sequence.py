"""One request's state: its token canvas, where it is in the blockwise schedule, its pages.

Its fields change only through its own methods: `admit` and `release` (the
scheduler's), `record_work` and `commit` (a step's), `finish` (the engine's).
With `editing` (an unmask policy that may re-decide written tokens, such as
LLaDA2.1's), a commit may also rewrite tokens of the current block, so the
current block's text is not final until the block ends.
`steps_taken` is its clock: the denoising steps it has committed, which the
cache policies' refresh schedules count (never the metrics in `stats`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from unmask.engine.outputs import FinishReason, RequestStats, TokenLogprob
from unmask.engine.params import SamplingParams


@dataclass(frozen=True)
class BlockLayout:
    """How a block-causal model cuts a sequence: blocks of `block_size` from position 0.

    `sub_block_size`: the block is committed sub-block by sub-block (Fast-dLLM
    v2), else None. `first_token_alone`: a block's first token is predicted
    from the previous block's last output before the rest is denoised (models
    with shifted logits).
    """

    block_size: int
    sub_block_size: int | None = None
    first_token_alone: bool = False

    def align_up(self, position: int) -> int:
        return -(-position // self.block_size) * self.block_size

    def block_start(self, position: int) -> int:
        """The first position of the block that holds `position`."""
        return position // self.block_size * self.block_size


def sequence_length(prompt_len: int, max_tokens: int, layout: BlockLayout | None) -> int:
    """Prompt plus canvas: `max_tokens`, run on to the end of the last block with a `layout`."""
    end = prompt_len + max_tokens
    return end if layout is None else layout.align_up(end)


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class UnmaskState:
    """Base of an unmask policy's own per-request state (e.g. the guide's KV); the policy makes it."""


@dataclass
class Commit:
    """What one `Sequence.commit` did."""

    tokens: int  # tokens committed (edits of written tokens included)
    finished_block_steps: int | None  # the steps the block took, if this commit finished it


@dataclass
class Sequence:
    """`tokens` holds prompt + canvas + suffix; canvas positions start as `mask_id`.

    The canvas has `max_tokens` positions. An infill request gives it as
    `canvas_ids` (masks at its spans, fixed tokens between them) and fixed
    `suffix_ids` after it; otherwise it is all masks and the suffix empty.
    Blocks cover the canvas in order; the last one may be shorter when
    `max_tokens` is not a multiple of the block length, and a block with
    nothing masked is skipped. `block` is the block being denoised and `step`
    the steps already taken inside it.

    A block-causal model's sequence has a `layout` (`BlockLayout`): its blocks
    are the model's, counted from position 0, so the first one holds the
    prompt's tail and is shorter; the canvas runs on to the end of the last
    block, as the model was trained, and only its first `max_tokens` count.
    Such a sequence has no infill: a fixed suffix after the padded canvas is
    not something a block-causal model attends to the way it was trained.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    mask_id: int
    eos_id: int
    seed: int
    unmask_state: UnmaskState | None = None  # the unmask policy's own state (`UnmaskPolicy.new_state`)
    tokens: torch.Tensor = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    pages: list[int] = field(default_factory=list)
    block: int = 0
    step: int = 0
    steps_taken: int = 0  # denoising steps committed so far: the policies' clock
    last_block: int = 0  # the block the latest step worked on (for streaming views)
    # Positions the latest step committed (delayed caching recomputes them once more).
    last_committed: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    stats: RequestStats = field(default_factory=RequestStats)
    token_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # by position, with params.logprobs
    generator: torch.Generator = field(init=False)
    layout: BlockLayout | None = None  # block-causal models only
    canvas_ids: list[int] | None = None  # infill: the canvas with its fixed tokens; None: all masks
    suffix_ids: list[int] = field(default_factory=list)  # infill: fixed tokens after the canvas
    initially_masked: torch.Tensor = field(init=False)  # bool per position: the model writes it
    has_inner_text: bool = field(init=False)  # the canvas holds fixed tokens between spans (infill of several)
    # The unmask policy may rewrite the current block's written tokens (`UnmaskPolicy.edits`); the block then
    # ends by the editing rule (`_block_ends`), and `post_edit_steps` counts its steps that began with no mask.
    editing: bool = False
    post_edit_steps: int = 0
    # The committed run (`committed_prefix`) ends at `_run_end`; `_run_eos` is its first end-of-text, if any.
    # Kept up to date by `commit` (the only writer of `tokens`), so the per-step outputs do not rescan the canvas.
    _run_end: int = field(init=False)
    _run_eos: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tokens = torch.tensor(self.prompt_ids + self._initial_canvas() + self.suffix_ids, dtype=torch.long)
        self.initially_masked = self.tokens == self.mask_id
        self.has_inner_text = not bool(self.initially_masked[self.prompt_len : self.canvas_end].all())
        self.generator = torch.Generator().manual_seed(self.seed)
        self._run_end = self.prompt_len
        self._extend_run()
        self._skip_written_blocks()

    def _initial_canvas(self) -> list[int]:
        """The canvas before any step: the infill canvas as given, else masks (to the last block's end, with a layout)."""
        if self.layout is not None and self.is_infill:
            raise ValueError("a block-causal sequence has no infill canvas or suffix")
        if self.canvas_ids is not None:
            if len(self.canvas_ids) != self.params.max_tokens:
                raise ValueError(f"the canvas has {len(self.canvas_ids)} tokens, max_tokens is {self.params.max_tokens}")
            return self.canvas_ids
        end = sequence_length(self.prompt_len, self.params.max_tokens, self.layout)
        return [self.mask_id] * (end - self.prompt_len)

    @property
    def is_infill(self) -> bool:
        """The request fixed text in the canvas or after it."""
        return self.canvas_ids is not None or bool(self.suffix_ids)

    # --- lifecycle ------------------------------------------------------------
    def admit(self, pages: list[int]) -> None:
        """Start running on `pages` (every page its prompt and canvas need)."""
        self.pages = pages
        self.status = SequenceStatus.RUNNING

    def release(self) -> list[int]:
        """Stop running; returns the pages it held, for the allocator to take back."""
        pages, self.pages = self.pages, []
        self.status = SequenceStatus.FINISHED
        return pages

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.finish_reason = reason
        if error is not None:
            self.error = error

    # --- a step -----------------------------------------------------------------
    def record_work(self, recomputed: int) -> None:
        """Count the positions a scheduled step recomputes for this sequence."""
        self.stats.active_positions += recomputed

    def commit(self, targets: torch.Tensor, tokens: torch.Tensor, logprobs: list[TokenLogprob] | None = None) -> Commit:
        """Write `tokens` at the positions `targets` of the current block, and advance the clock.

        The targets are masked positions, or with `editing` also written ones (an edit).
        `logprobs` (one per target, when the request asks for them) are kept by position.
        The block ends when nothing in it is left masked (with `editing`: by `_block_ends`); the
        next step starts the next block with something to write. `targets` may be empty (a
        schedule step that commits nothing).
        """
        # What the editing rule reads; without editing every target is masked (no per-step cost there).
        began_masked = not self.editing or self.block_has_masks()
        edited = targets[self.tokens[targets] != self.mask_id] if self.editing else targets[:0]
        self.tokens[targets] = tokens
        if edited.numel():
            self._revise_run(int(edited.min()))
        self._extend_run()
        if logprobs is not None:
            self.token_logprobs.update(zip(targets.tolist(), logprobs))
        self.last_committed = targets
        self.last_block = self.block
        self.step += 1
        self.steps_taken += 1
        self.stats.forward_passes += 1
        self.stats.tokens_committed += targets.numel()
        if self.editing and not began_masked:
            self.post_edit_steps += 1
        if not self._block_ends(began_masked, edited.numel() > 0):
            return Commit(targets.numel(), None)
        self.stats.steps_per_block.append(self.step)
        finished = self.step
        self._next_block()
        return Commit(targets.numel(), finished)

    # --- geometry -----------------------------------------------------------
    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def length(self) -> int:
        return self.tokens.numel()

    @property
    def canvas_end(self) -> int:
        """Absolute end of the canvas (the suffix, if any, starts here; with a layout, the last block's end)."""
        return self.length - len(self.suffix_ids)

    @property
    def block_size(self) -> int:
        return self.params.block_size if self.layout is None else self.layout.block_size

    @property
    def num_blocks(self) -> int:
        if self.layout is not None:
            return self.length // self.block_size - self.prompt_len // self.block_size
        return -(-self.params.max_tokens // self.block_size)

    def block_bounds(self, block: int | None = None) -> tuple[int, int]:
        """Absolute [start, end) canvas positions of a block (the current one by default)."""
        b = self.block if block is None else block
        if self.layout is not None:
            first = self.prompt_len // self.block_size + b  # the block's index counted from position 0
            return max(self.prompt_len, first * self.block_size), (first + 1) * self.block_size
        start = self.prompt_len + b * self.block_size
        return start, min(start + self.block_size, self.canvas_end)

    def masked_in_block(self) -> torch.Tensor:
        """Absolute positions still masked in the current block, ascending: the ones this step proposes for.

        With a `layout`, fewer: the block's first token alone when the model
        predicts it from the previous block (`entering_block`), else the
        masked positions of the first sub-block that has any.
        """
        start, end = self.block_bounds()
        if self.entering_block():
            return torch.tensor([start])
        masked = start + torch.nonzero(self.tokens[start:end] == self.mask_id).flatten()
        if self.layout is not None and self.layout.sub_block_size is not None and masked.numel():
            sub = self.layout.sub_block_size
            masked = masked[masked < int(masked[0]) // sub * sub + sub]
        return masked

    def proposal_targets(self) -> torch.Tensor:
        """Absolute positions this step proposes tokens for, ascending: `masked_in_block`, or with `editing`
        every position of the current block the model writes (its written tokens may be re-decided)."""
        if not self.editing:
            return self.masked_in_block()
        start, end = self.block_bounds()
        return start + torch.nonzero(self.initially_masked[start:end]).flatten()

    def _block_ends(self, began_masked: bool, edited: bool) -> bool:
        """Nothing in the block is left masked and, with `editing`, the block is settled: LLaDA2.1's rule, a
        step that began with nothing masked rewrote nothing, or `max_post_edit_steps` such steps were taken."""
        if self.block_has_masks():
            return False
        if not self.editing:
            return True
        assert self.params.max_post_edit_steps is not None
        return (not began_masked and not edited) or self.post_edit_steps >= self.params.max_post_edit_steps

    def block_has_masks(self) -> bool:
        """Some position of the current block is still masked (its sub-blocks and first token included)."""
        start, end = self.block_bounds()
        return bool((self.tokens[start:end] == self.mask_id).any())

    def block_masks(self) -> int:
        """Positions of the current block the model has to write (all of them, unless infill fixed some)."""
        start, end = self.block_bounds()
        return int(self.initially_masked[start:end].sum())

    def _next_block(self) -> None:
        """Move to the next block that has something to write."""
        self.block, self.step, self.post_edit_steps = self.block + 1, 0, 0
        self._skip_written_blocks()

    def _skip_written_blocks(self) -> None:
        """Pass over blocks with nothing masked (infill text), recording that they took no steps."""
        while not self.canvas_done and self.block_masks() == 0:
            self.stats.steps_per_block.append(0)
            self.block += 1

    def entering_block(self) -> bool:
        """This step predicts the block's first token alone, from the previous block's last output.

        So a model with shifted logits is decoded as it was trained (Fast-dLLM
        v2): the first token of every block is written autoregressively, then
        the rest of the block is denoised with it in place.
        """
        if self.layout is None or not self.layout.first_token_alone:
            return False
        start, _ = self.block_bounds()
        return start % self.block_size == 0 and int(self.tokens[start]) == self.mask_id

    def steps_in_block(self) -> int:
        """Denoising steps the fixed-step policies spend on the current block (`SamplingParams.steps_for_block`)."""
        start, end = self.block_bounds()
        return self.params.steps_for_block(end - start)

    # --- finalized output ---------------------------------------------------
    def _extend_run(self) -> None:
        """Move `_run_end` past the tokens committed contiguously after it (up to `max_tokens`), noting end-of-text."""
        limit = self.prompt_len + self.params.max_tokens
        start = self._run_end
        masked = torch.nonzero(self.tokens[start:limit] == self.mask_id).flatten()
        self._run_end = start + int(masked[0]) if masked.numel() else min(limit, self.length)
        if self._run_eos is None and self._run_end > start:
            eos = torch.nonzero(self.tokens[start : self._run_end] == self.eos_id).flatten()
            if eos.numel():
                self._run_eos = start + int(eos[0])

    def _revise_run(self, first_edit: int) -> None:
        """Tokens from `first_edit` on were rewritten: find the run's first end-of-text again if it may have moved.

        The run's end stays (an edit never writes a mask); an end-of-text before the edit stays the first.
        """
        if first_edit >= self._run_end or (self._run_eos is not None and self._run_eos < first_edit):
            return
        eos = torch.nonzero(self.tokens[first_edit : self._run_end] == self.eos_id).flatten()
        self._run_eos = first_edit + int(eos[0]) if eos.numel() else None

    def _final_end(self) -> int:
        """Where the text no later step can change ends: the run's end, and with `editing` at most the
        current block's start (its written tokens may still be re-decided)."""
        if not self.editing or self.canvas_done:
            return self._run_end
        return min(self._run_end, self.block_bounds()[0])

    def committed_prefix(self) -> list[int]:
        """The canvas tokens committed contiguously from its start (up to the first mask, at most
        `max_tokens`, with `editing` up to the current block), cut before end-of-text (unless the
        request ignores it).

        No later step changes these tokens, so this prefix is final text.
        """
        end = self._final_end()
        if not self.params.ignore_eos and self._run_eos is not None:
            end = min(end, self._run_eos)
        return self.tokens[self.prompt_len : end].tolist()

    def hit_eos(self) -> bool:
        """End-of-text lies in the final part of the committed run, so nothing after it can matter.

        Never with `ignore_eos`, nor when the canvas holds fixed text between spans: the
        spans after an end-of-text still have to be written.
        """
        if self.params.ignore_eos or self.has_inner_text or self._run_eos is None:
            return False
        return self._run_eos < self._final_end()

    @property
    def canvas_done(self) -> bool:
        return self.block >= self.num_blocks

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

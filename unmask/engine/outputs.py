"""What the engine hands back for a request: protocol-free dataclasses.

The server translates these into OpenAI responses; the offline `LLM` API
returns the final one of each request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-text or a stop string
    LENGTH = "length"  # the canvas (max_tokens) is full
    ABORT = "abort"  # the client went away or called abort
    ERROR = "error"  # the engine failed on this request alone


@dataclass
class BlockView:
    """The current partially unmasked block of a request, for streaming."""

    index: int  # block index within the canvas, from 0
    step: int  # denoising steps taken in this block so far
    token_ids: list[int]  # the block's tokens; masked positions hold the mask id
    masked: list[bool]  # True where the position is still masked
    pieces: list[str]  # each token's text ("" for masked positions)

    @property
    def num_masked(self) -> int:
        return sum(self.masked)

    def text(self, placeholder: str = "\u2591") -> str:
        """The block's text with `placeholder` standing for each masked token."""
        return "".join(placeholder if m else p for p, m in zip(self.pieces, self.masked))


@dataclass
class TokenLogprob:
    """One token's log-probability and the likeliest alternatives at the same position.

    For a generated token: the model's distribution at the step that committed it;
    for a scored prompt token: the distribution given the tokens before it (see `engine.scoring`).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), likeliest first


@dataclass
class PromptScores:
    """A scored prompt: its tokens and each one's score given the tokens before it (the first has none)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class RequestStats:
    """Per-request counters; `forward_passes` counts denoising steps this request took part in."""

    forward_passes: int = 0
    tokens_committed: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    active_positions: int = 0  # positions recomputed, summed over steps

    @property
    def tokens_per_step(self) -> float:
        return self.tokens_committed / self.forward_passes if self.forward_passes else 0.0


@dataclass
class RequestOutput:
    """One update of a request.

    `delta_text` is newly *finalized* text (never revised later), in order: the
    concatenation of all deltas equals the final `text`.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    block: BlockView | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    # With `SamplingParams.logprobs`, on the final output: one entry per token of `token_ids`,
    # then one for the end-of-text token that ended the request, if one did.
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StepStats:
    """One engine step, for metrics: what ran and how long it took."""

    batch_size: int
    active_tokens: int
    tokens_committed: int
    step_seconds: float
    pages_in_use: int
    pages_total: int
    num_running: int
    num_waiting: int
    policies: list[tuple[str, str]]  # (cache, unmask) of each sequence in the step
    finished_blocks: list[int] = field(default_factory=list)  # steps each block that ended here took

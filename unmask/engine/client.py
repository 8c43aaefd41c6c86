"""What a front end (the HTTP server) may ask of a running engine: the engine client interface.

The server holds its engine through `EngineClient` only, so it never reaches
into the engine's internals and a test or another engine can stand behind it.
`AsyncEngine` is the implementation.

One HTTP request is one *request group* (one engine request per choice), and
its outputs come back through one `OutputStream`: the engine thread fills it,
the server reads it, and closing it is the one way to abort the group. Prompts
scored for prompt logprobs (`engine.scoring`) form a *scoring group* the same
way: one stream of scores, closed to stop the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol, TypeVar

from unmask.engine.infill import Infill
from unmask.engine.outputs import PromptScores, RequestOutput
from unmask.engine.params import SamplingParams

if TYPE_CHECKING:
    from unmask.engine.config import EngineConfig
    from unmask.engine.engine import StepListener


@dataclass(frozen=True)
class GroupMember:
    """One engine request of a group: its id (unique while it runs), prompt and parameters."""

    request_id: str
    prompt: str | list[int] | Infill
    params: SamplingParams


Item = TypeVar("Item", covariant=True)


class OutputStream(Protocol[Item]):
    """What one group's members produce, as (member index, item), until every member has finished:
    a request group's `RequestOutput`s, or a scoring group's `PromptScores` (one per prompt).

    Iteration raises `EngineDeadError` if the engine stops serving the group
    (shutdown deadline, refused while draining); `close` aborts the members
    that have not finished and frees their pages (synchronous, idempotent).
    """

    def __aiter__(self) -> AsyncIterator[tuple[int, Item]]: ...

    async def __anext__(self) -> tuple[int, Item]: ...

    def interrupt(self, error: BaseException) -> None:
        """Make the reader's pending (or next) wait raise `error` (e.g. the client went away)."""

    def close(self) -> None: ...


class EngineClient(Protocol):
    """The engine as the server sees it."""

    config: EngineConfig

    async def start(self) -> None:
        """Load the model and start serving."""

    def begin_drain(self, timeout: float | None) -> None:
        """Stop accepting requests; those still open after `timeout` seconds end with `EngineDeadError`."""

    async def shutdown(self, drain: bool = True) -> None:
        """Stop; with `drain`, once every open request has ended."""

    async def add_group(self, members: list[GroupMember]) -> OutputStream[RequestOutput]:
        """Queue every member or none (raising `ParamError`, `QueueFullError` or `EngineDeadError`)."""

    async def add_scoring(
        self, request_id: str, prompts: list[str | list[int]], top_k: int
    ) -> OutputStream[PromptScores]:
        """Queue every prompt for scoring or none (raising `ParamError` or `EngineDeadError`);
        each prompt's scores (with its `top_k` likeliest alternatives per token) arrive once."""

    def add_step_listener(self, listener: StepListener) -> None: ...

    @property
    def tokenizer(self): ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def waiting_for(self) -> str | None:
        """What the head of the waiting queue waits for: "kv_pages", "sequence_slot", "admission" (the
        engine's next step), or None when nothing waits."""

    @property
    def kv_pages_free(self) -> int: ...

    @property
    def kv_pages_total(self) -> int: ...

"""The scheduler: admission against free pages, and each step's plan.

Admission is first come, first served and reserves every page a sequence will
need (a diffusion canvas never grows, so an admitted sequence never waits for
memory again). Each step's plan holds the admitted sequences whose work fits
the token budget, least recently run first, so a long refresh never starves
the others. A sequence's work is what its policy answers (the `planner` the
engine gives the scheduler); the scheduler reads only its cost. It works on
page ids and `Sequence` methods, and imports no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Generic, Protocol, TypeVar

from unmask.engine.errors import QueueFullError
from unmask.engine.pages import PageAllocator
from unmask.engine.params import ParamError

if TYPE_CHECKING:
    from unmask.engine.sequence import Sequence


class Work(Protocol):
    """One sequence's share of a step, as far as the scheduler is concerned."""

    @property
    def seq(self) -> Sequence: ...

    @property
    def cost(self) -> int:
        """Positions this work packs into the step (counted against `max_num_batched_tokens`)."""
        ...


W = TypeVar("W", bound=Work)


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int


class Scheduler(Generic[W]):
    def __init__(self, pages: PageAllocator, limits: SchedulerLimits, planner: Callable[[Sequence], W]):
        self.pages = pages
        self.limits = limits
        self.planner = planner  # a running sequence's work at this step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._steps = 0
        self._last_run: dict[int, int] = {}  # id(sequence) -> the step it last ran in (round-robin fairness)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence, or refuse it if it can never fit or the queue is full."""
        if self.pages.pages_for(seq.length) > self.pages.num_pages:
            raise ParamError(
                "max_tokens",
                f"prompt ({seq.prompt_len}) + max_tokens ({seq.params.max_tokens}) tokens exceed the KV cache "
                f"({self.pages.capacity_tokens} tokens)",
            )
        if len(self.waiting) >= self.limits.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting; the limit is {self.limits.max_waiting}")
        self.waiting.append(seq)

    def admit(self) -> None:
        """Move waiting sequences to running while their pages fit (strict FCFS: none overtakes the head)."""
        while self.waiting and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if not self.pages.can_allocate(seq.length):
                break
            self.waiting.popleft()
            seq.admit(self.pages.allocate(seq.length))
            self._last_run[id(seq)] = -1
            self.running.append(seq)

    def schedule(self) -> list[W]:
        """Admit what fits, then plan this step: each chosen sequence's work, under the token budget."""
        self.admit()
        self._steps += 1
        plan: list[W] = []
        budget = self.limits.max_num_batched_tokens
        for seq in sorted(self.running, key=lambda s: (self._last_run[id(s)], s.arrival_time)):
            work = self.planner(seq)
            if plan and work.cost > budget:
                continue
            plan.append(work)
            budget -= work.cost
            self._last_run[id(seq)] = self._steps
        return plan

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and take its pages back."""
        if seq in self.running:
            self.running.remove(seq)
            del self._last_run[id(seq)]
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.free(seq.release())

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

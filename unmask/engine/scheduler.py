"""The scheduler: admission against free pages, which sequences run each step, abort.

It works on `Sequence` state and page ids only. Admission is first come,
first served and reserves every page a sequence will need (a diffusion canvas
never grows, so an admitted sequence never waits for memory again). Each step
runs the admitted sequences that fit the token budget, least recently run
first, so a long refresh never starves the others.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from unmask.engine.errors import QueueFullError
from unmask.engine.kv_pool import KVPool
from unmask.engine.params import ParamError
from unmask.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int


class Scheduler:
    def __init__(self, pool: KVPool, limits: SchedulerLimits):
        self.pool = pool
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._steps = 0

    def add(self, seq: Sequence) -> None:
        """Queue a sequence, or refuse it if it can never fit or the queue is full."""
        if self.pool.pages_for(seq.length) > self.pool.num_pages:
            raise ParamError(
                "max_tokens",
                f"prompt ({seq.prompt_len}) + max_tokens ({seq.params.max_tokens}) tokens exceed the KV cache "
                f"({self.pool.num_pages * self.pool.page_size} tokens)",
            )
        if len(self.waiting) >= self.limits.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting; the limit is {self.limits.max_waiting}")
        self.waiting.append(seq)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if self.pool.pages_for(seq.length) > self.pool.num_free:
                break  # strict FCFS: later requests never overtake the head
            self.waiting.popleft()
            seq.pages = self.pool.allocate(seq.length)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def schedule(self, active_tokens) -> list[Sequence]:
        """Admit what fits, then pick this step's sequences under the token budget.

        `active_tokens(seq)` says how many positions the sequence would recompute.
        """
        self._admit()
        self._steps += 1
        batch, budget = [], self.limits.max_num_batched_tokens
        for seq in sorted(self.running, key=lambda s: (s.last_scheduled, s.arrival_time)):
            cost = active_tokens(seq)
            if batch and cost > budget:
                continue
            batch.append(seq)
            budget -= cost
            seq.last_scheduled = self._steps
        return batch

    def finish(self, seq: Sequence) -> None:
        """Mark a sequence finished and return its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.pages)
        seq.pages = []
        seq.status = SequenceStatus.FINISHED

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

"""The async engine for the server: the step loop on its own thread, one output stream per request group.

The model's forward pass blocks (CPU or GPU), so the loop runs on a
dedicated thread and the event loop stays free for HTTP. Requests and aborts
cross into the thread through a command queue. Outputs cross back through one
`GroupStream` per request group (vLLM's output-collector pattern): after each
step the thread hands all groups their outputs in one `call_soon_threadsafe`
(one wake-up of the event loop per step, however many requests run), and each
reader awaits a single queue, so there is no task per request.

Prompt scoring (`engine.scoring`) runs on the same thread, one chunk of the
oldest scoring job after each step, so it never stalls generation for long;
its results come back through a `ScoringStream` per scoring group, which is
closed to stop the work, as a `GroupStream` is closed to abort.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from unmask.engine.client import EngineClient, GroupMember
from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine, StepListener
from unmask.engine.errors import EngineDeadError, QueueFullError
from unmask.engine.infill import Infill
from unmask.engine.outputs import FinishReason, PromptScores, RequestOutput
from unmask.engine.params import SamplingParams
from unmask.engine.policies import UNMASK_POLICIES
from unmask.engine.scoring import ScoringJob
from unmask.engine.sequence import Sequence

log = logging.getLogger("unmask.async_engine")

_IDLE_WAIT_SECONDS = 0.1
_CYCLE_TIME_SMOOTHING = 0.2  # weight of the latest loop cycle in the running mean

Item = TypeVar("Item")


@dataclass
class _AddGroup:
    seqs: list[Sequence]


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _AddScoring:
    stream: "ScoringStream"
    jobs: list[ScoringJob]


@dataclass
class _DropScoring:
    stream: "ScoringStream"


@dataclass
class _ScoringWork:
    """A prompt being scored on the engine thread, and the stream its scores go to."""

    stream: "ScoringStream"
    index: int  # the prompt's place in its scoring group
    job: ScoringJob


class _MemberStream(Generic[Item]):
    """What the members of one group produce, in arrival order, as (member index, item).

    Filled by the engine thread (`_push`, `_fail` through the event loop), read
    by one consumer. Ends after every member's final item; raises what
    `interrupt` or the engine put in. `close` hands the unfinished members back
    to the engine (`_released`), which stops their work.
    """

    def __init__(self, engine: "AsyncEngine", request_ids: list[str], loop: asyncio.AbstractEventLoop):
        self._engine, self._loop = engine, loop
        self.request_ids = request_ids
        self._items: asyncio.Queue = asyncio.Queue()
        self._unfinished = set(range(len(request_ids)))
        self._closed = False

    def __aiter__(self) -> "_MemberStream[Item]":
        return self

    async def __anext__(self) -> tuple[int, Item]:
        if not self._unfinished or self._closed:
            raise StopAsyncIteration
        entry = await self._items.get()
        if isinstance(entry, BaseException):
            self.close()
            raise entry
        index, item = entry
        if self._is_final(item):
            self._unfinished.discard(index)
        return index, item

    def interrupt(self, error: BaseException) -> None:
        self._items.put_nowait(error)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._released([self.request_ids[i] for i in sorted(self._unfinished)])

    def _is_final(self, item: Item) -> bool:
        raise NotImplementedError

    def _released(self, unfinished: list[str]) -> None:
        raise NotImplementedError

    # --- called on the event loop, scheduled by the engine thread ---------------------
    def _push(self, items: list[tuple[int, Item]]) -> None:
        for item in items:
            self._items.put_nowait(item)

    def _fail(self, error: BaseException) -> None:
        self._items.put_nowait(error)


class GroupStream(_MemberStream[RequestOutput]):
    """The outputs of one request group; `close` aborts the unfinished members."""

    def _is_final(self, item: RequestOutput) -> bool:
        return item.finished

    def _released(self, unfinished: list[str]) -> None:
        self._engine._release(self, unfinished)


class ScoringStream(_MemberStream[PromptScores]):
    """The scores of one scoring group's prompts, each once; `close` stops scoring the rest."""

    def _is_final(self, item: PromptScores) -> bool:
        return True

    def _released(self, unfinished: list[str]) -> None:
        self._engine._release_scoring(self, unfinished)


class RequestStream:
    """The outputs of a single request (a group of one); `aclose` aborts it."""

    def __init__(self, group: GroupStream):
        self._group = group
        self.request_id = group.request_ids[0]

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        _, out = await self._group.__anext__()
        return out

    async def aclose(self) -> None:
        self._group.close()


class AsyncEngine(EngineClient):
    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (its group's stream, its index in the group), while the group is open
        self._channels: dict[str, tuple[GroupStream, int]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._draining = False
        self._drain_deadline: float | None = None  # time.monotonic() after which open requests are cut
        self._failure: BaseException | None = None
        self._listeners: list[StepListener] = []
        self._mean_cycle_seconds: float | None = None  # one step and its delivery, for the drain deadline
        self._pending = 0  # adds sent to the thread but not yet queued in the scheduler
        self._pending_lock = threading.Lock()
        self._scoring: list[_ScoringWork] = []  # engine thread only: prompts being scored, first come first served
        self._scoring_open = 0  # prompts sent to the thread to score and not yet scored or dropped (under _pending_lock)

    # --- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (off the event loop) and start the engine thread."""
        self.engine = await asyncio.to_thread(LLMEngine, self.config)
        self.engine.step_listeners.extend(self._listeners)
        self._thread = threading.Thread(target=self._loop, name="unmask-engine", daemon=True)
        self._thread.start()

    def begin_drain(self, timeout: float | None) -> None:
        """Refuse new requests from now on; after `timeout` seconds, end every open one (and every
        scoring group still being scored) with `EngineDeadError`.

        While draining, a waiting request that cannot finish before the deadline (the
        fewest steps until a sequence slot frees plus its own fewest steps, at the recent
        time per step) is refused at once.
        """
        self._draining = True
        if timeout is not None:
            self._drain_deadline = time.monotonic() + timeout

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting requests; with `drain`, let in-flight ones finish (or reach the drain deadline) first."""
        self._draining = True
        if drain:
            while self.engine is not None and self.is_alive and (
                self.engine.has_unfinished or self._pending or self._scoring_open
            ):
                await asyncio.sleep(0.05)
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failure is None

    @property
    def accepting(self) -> bool:
        return self.is_alive and not self._draining

    # --- facts the server needs ---------------------------------------------------
    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.config.model_dir.rstrip("/").split("/")[-1]

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def num_running(self) -> int:
        return len(self._engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._engine.scheduler.waiting) + self._pending

    @property
    def waiting_for(self) -> str | None:
        """Why the waiting queue does not move: its head (admission is strict FCFS) needs a sequence
        slot (`max_num_seqs` are running) or more free KV pages than there are."""
        scheduler = self._engine.scheduler
        try:
            head = scheduler.waiting[0]
        except IndexError:  # empty, or emptied by the engine thread meanwhile
            return "admission" if self._pending else None
        if len(scheduler.running) >= self.config.max_num_seqs:
            return "sequence_slot"
        if self._engine.pool.pages_for(head.length) > self._engine.pool.num_free:
            return "kv_pages"
        return "admission"  # admitted at the next step

    @property
    def kv_pages_free(self) -> int:
        return self._engine.pool.num_free

    @property
    def kv_pages_total(self) -> int:
        return self._engine.pool.num_pages

    @property
    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise EngineDeadError("the engine has not been started")
        return self.engine

    def add_step_listener(self, listener: StepListener) -> None:
        self._listeners.append(listener)
        if self.engine is not None:
            self.engine.step_listeners.append(listener)

    # --- requests -----------------------------------------------------------------
    async def add_group(self, members: list[GroupMember]) -> GroupStream:
        """Queue every member or none (raising ParamError / QueueFullError / EngineDeadError); stream their outputs.

        Tokenizing and validating run on a worker thread: a prompt of megabytes
        takes long to tokenize, and the event loop must keep serving everyone else.
        """
        seqs = await asyncio.to_thread(
            lambda: [self._engine.make_sequence(m.request_id, m.prompt, m.params) for m in members]
        )
        # Checked after the await, with no await before queueing: shutdown may have begun meanwhile.
        if not self.accepting:
            raise EngineDeadError("the engine is shutting down" if self._draining else "the engine is not running")
        if self.num_waiting + len(seqs) > self.config.max_waiting:
            raise QueueFullError(f"{self.num_waiting} requests are waiting; the limit is {self.config.max_waiting}")
        ids = [seq.request_id for seq in seqs]
        if len(set(ids)) < len(ids) or any(i in self._channels for i in ids):
            raise ValueError(f"request ids {ids!r} repeat or are already in use")
        stream = GroupStream(self, ids, asyncio.get_running_loop())
        for index, request_id in enumerate(ids):
            self._channels[request_id] = (stream, index)
        with self._pending_lock:
            self._pending += len(seqs)
        self._commands.put(_AddGroup(seqs))
        return stream

    async def add_request(
        self, request_id: str, prompt: str | list[int] | Infill, params: SamplingParams
    ) -> RequestStream:
        """One request as a group of one: its outputs, and `aclose` to abort it."""
        return RequestStream(await self.add_group([GroupMember(request_id, prompt, params)]))

    def _release(self, stream: GroupStream, unfinished: list[str]) -> None:
        """A group's stream closed: stop delivering to it and abort its unfinished members."""
        for request_id in stream.request_ids:
            self._channels.pop(request_id, None)
        if unfinished:
            self._commands.put(_Abort(unfinished))

    async def add_scoring(self, request_id: str, prompts: list[str | list[int]], top_k: int) -> ScoringStream:
        """Queue every prompt for scoring (`engine.scoring`) or none (raising ParamError / EngineDeadError);
        stream their scores, as (prompt index, `PromptScores`), each as soon as it is complete.

        The prompts are scored on the engine thread a chunk at a time between steps,
        oldest first; closing the stream stops scoring those not yet scored.
        Prompt `i`'s job is named `{request_id}-{i}`.
        """
        jobs = await asyncio.to_thread(
            lambda: [self._engine.make_scoring_job(f"{request_id}-{i}", p, top_k) for i, p in enumerate(prompts)]
        )
        # Checked after the await, with no await before queueing: shutdown may have begun meanwhile.
        if not self.accepting:
            raise EngineDeadError("the engine is shutting down" if self._draining else "the engine is not running")
        stream = ScoringStream(self, [job.request_id for job in jobs], asyncio.get_running_loop())
        with self._pending_lock:
            self._scoring_open += len(jobs)
        self._commands.put(_AddScoring(stream, jobs))
        return stream

    async def score(self, request_id: str, prompt: str | list[int], top_k: int) -> PromptScores:
        """One prompt's scores; cancelling the wait stops its work on the engine."""
        stream = await self.add_scoring(request_id, [prompt], top_k)
        try:
            _, scores = await stream.__anext__()
            return scores
        finally:
            stream.close()

    def _release_scoring(self, stream: ScoringStream, unfinished: list[str]) -> None:
        """A scoring group's stream closed: stop scoring its prompts that have no scores yet."""
        if unfinished:
            self._commands.put(_DropScoring(stream))

    # --- the engine thread ----------------------------------------------------------
    def _loop(self) -> None:
        engine = self._engine
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not (engine.has_unfinished or self._scoring))
                if self._drain_deadline is not None:
                    self._enforce_drain_deadline()
                if engine.has_unfinished:
                    started = time.monotonic()
                    self._deliver(engine.step())
                    self._time_cycle(time.monotonic() - started)
                if self._scoring:
                    self._score_next_chunk()
        except BaseException as exc:  # the loop is dead; fail every waiting client instead of hanging them
            log.exception("engine loop died")
            self._failure = exc
            self._fail_all(f"engine loop died: {type(exc).__name__}: {exc}")
        finally:
            engine.close()  # tensor-parallel workers stop with the loop that drives them

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_SECONDS) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: _AddGroup | _Abort | _AddScoring | _DropScoring) -> None:
        engine = self._engine
        if isinstance(command, _Abort):
            self._deliver([out for out in map(engine.abort, command.request_ids) if out is not None])
            return
        if isinstance(command, _AddScoring):
            self._scoring.extend(_ScoringWork(command.stream, i, job) for i, job in enumerate(command.jobs))
            return
        if isinstance(command, _DropScoring):
            self._take_scoring(lambda work: work.stream is command.stream)
            return
        with self._pending_lock:
            self._pending -= len(command.seqs)
        for seq in command.seqs:
            if seq.request_id not in self._channels:
                continue  # its group was closed before it reached the engine
            try:
                engine.add_sequence(seq)
            except Exception as exc:
                self._deliver([_error_output(seq, exc)])

    def _score_next_chunk(self) -> None:
        """One chunk of the oldest scoring job. A job that fails fails its whole group (the
        response is an error anyway) and nothing else."""
        work = self._scoring[0]
        try:
            self._engine.run_scoring(work.job)
        except Exception as exc:
            log.exception("scoring %s failed", work.job.request_id)
            self._fail_scoring(self._take_scoring(lambda other: other.stream is work.stream), exc)
            return
        if work.job.done:
            self._take_scoring(lambda other: other is work)
            work.stream._loop.call_soon_threadsafe(work.stream._push, [(work.index, work.job.result())])

    def _take_scoring(self, chosen: Callable[[_ScoringWork], bool]) -> list[_ScoringWork]:
        """Remove the scoring work `chosen(work)` picks; it is no longer open."""
        taken = [work for work in self._scoring if chosen(work)]
        self._scoring = [work for work in self._scoring if not chosen(work)]
        with self._pending_lock:
            self._scoring_open -= len(taken)
        return taken

    @staticmethod
    def _fail_scoring(works: list[_ScoringWork], error: BaseException) -> None:
        """End the streams of these works' groups with `error` (once per group)."""
        for stream in {work.stream for work in works}:
            stream._loop.call_soon_threadsafe(stream._fail, error)

    def _enforce_drain_deadline(self) -> None:
        """While draining: cut everything at the deadline; before it, refuse the waiting that cannot make it.

        Scoring is cut at the deadline too; before it, it runs on (a chunk costs no sequence slot).
        """
        remaining = self._drain_deadline - time.monotonic()
        scheduler = self._engine.scheduler
        if remaining <= 0:
            doomed = list(scheduler.running) + list(scheduler.waiting)
            reason = "the server shut down before this request finished (shutdown timeout reached)"
            self._fail_scoring(self._take_scoring(lambda work: True), EngineDeadError(reason))
        elif self._mean_cycle_seconds is not None:
            steps_left = remaining / self._mean_cycle_seconds
            slot_wait = self._steps_until_a_slot_frees()
            doomed = [s for s in scheduler.waiting if slot_wait + _fewest_steps(s) > steps_left]
            reason = f"the server is shutting down and this request cannot finish in the {remaining:.1f} s left"
        else:
            return
        for seq in doomed:
            self._engine.abort(seq.request_id)
            self._fail(seq.request_id, EngineDeadError(reason))

    def _steps_until_a_slot_frees(self) -> int:
        """The fewest steps before a waiting request can be admitted, as far as sequence slots go."""
        running = self._engine.scheduler.running
        if len(running) < self.config.max_num_seqs:
            return 0
        return min(max(0, _fewest_steps(s) - s.steps_taken) for s in running)

    def _time_cycle(self, seconds: float) -> None:
        previous = self._mean_cycle_seconds
        self._mean_cycle_seconds = (
            seconds if previous is None else previous + _CYCLE_TIME_SMOOTHING * (seconds - previous)
        )

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand every group its outputs of this step in one hop to the event loop.

        One `call_soon_threadsafe` per step, not per group: each such call writes to the
        loop's wake-up socket, a system call that gives up the GIL, and taking the GIL
        back can wait for the event loop thread, on the engine thread's critical path.
        """
        batches: dict[GroupStream, list[tuple[int, RequestOutput]]] = {}
        for out in outputs:
            target = self._channels.get(out.request_id)
            if target is None:
                continue
            stream, index = target
            batches.setdefault(stream, []).append((index, out))
            if out.finished:
                self._channels.pop(out.request_id, None)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GroupStream, list[tuple[int, RequestOutput]]]]] = {}
        for stream, items in batches.items():
            by_loop.setdefault(stream._loop, []).append((stream, items))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_push_each, deliveries)

    def _fail(self, request_id: str, error: BaseException) -> None:
        target = self._channels.pop(request_id, None)
        if target is not None:
            stream = target[0]
            stream._loop.call_soon_threadsafe(stream._fail, error)

    def _fail_all(self, message: str) -> None:
        self._fail_scoring(self._take_scoring(lambda work: True), EngineDeadError(message))
        for request_id in list(self._channels):
            self._deliver(
                [RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ERROR, error=message)]
            )


def _push_each(deliveries: list[tuple[GroupStream, list[tuple[int, RequestOutput]]]]) -> None:
    """On the event loop: queue each group's outputs of one step in its stream."""
    for stream, items in deliveries:
        stream._push(items)


def _fewest_steps(seq: Sequence) -> int:
    """The fewest steps a request can finish in: a lower bound, so only a request that surely
    cannot make a deadline is refused. End-of-text or a stop string may end it after one step,
    and an infill canvas's fixed text may leave whole blocks with nothing to write; otherwise
    it takes its unmask policy's fewest steps over the canvas."""
    params = seq.params
    if not params.ignore_eos or params.stop or seq.has_inner_text:
        return 1
    return UNMASK_POLICIES[params.unmask].fewest_steps(params)


def _error_output(seq: Sequence, exc: Exception) -> RequestOutput:
    return RequestOutput(
        seq.request_id, seq.prompt_ids, finished=True, finish_reason=FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}"
    )

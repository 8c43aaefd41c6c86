"""The async engine for the server: the step loop on its own thread, outputs via asyncio queues.

The model's forward pass blocks (CPU or GPU), so the loop runs on a
dedicated thread and the event loop stays free for HTTP. Requests and aborts
cross into the thread through a command queue; each request's outputs cross
back through its own `asyncio.Queue` (`call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine, StepListener
from unmask.engine.errors import EngineDeadError, QueueFullError
from unmask.engine.outputs import FinishReason, PromptScores, RequestOutput
from unmask.engine.params import SamplingParams
from unmask.engine.scoring import ScoringJob
from unmask.engine.sequence import Sequence

log = logging.getLogger("unmask.async_engine")

_IDLE_WAIT_SECONDS = 0.1


@dataclass
class _Add:
    seq: Sequence


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Score:
    """A prompt to score on the engine thread; its scores (or failure) are set on `future`."""

    job: ScoringJob
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._draining = False
        self._failure: BaseException | None = None
        self._listeners: list[StepListener] = []
        self._pending = 0  # adds sent to the thread but not yet queued in the scheduler
        self._pending_lock = threading.Lock()
        self._scoring: list[_Score] = []  # engine thread only: prompts being scored, first come first served

    # --- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (off the event loop) and start the engine thread."""
        self.engine = await asyncio.to_thread(LLMEngine, self.config)
        self.engine.step_listeners.extend(self._listeners)
        self._thread = threading.Thread(target=self._loop, name="unmask-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting requests; with `drain`, let in-flight ones finish first."""
        self._draining = True
        if drain:
            while self.engine is not None and self.is_alive and (self.engine.has_unfinished or self._pending or self._scoring):
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
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> "RequestStream":
        """Validate now (raising ParamError / QueueFullError / EngineDeadError), then stream outputs.

        Tokenizing and validating run on a worker thread: a prompt of megabytes
        takes long to tokenize, and the event loop must keep serving everyone else.
        """
        seq = await asyncio.to_thread(self._engine.make_sequence, request_id, prompt, params)
        # Checked after the await, with no await before queueing: shutdown may have begun meanwhile.
        if not self.accepting:
            raise EngineDeadError("the engine is shutting down" if self._draining else "the engine is not running")
        if self.num_waiting >= self.config.max_waiting:
            raise QueueFullError(f"{self.num_waiting} requests are waiting; the limit is {self.config.max_waiting}")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        out_queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), out_queue)
        with self._pending_lock:
            self._pending += 1
        self._commands.put(_Add(seq))
        return RequestStream(self, request_id, out_queue)

    async def score(self, request_id: str, prompt: str | list[int], top_k: int) -> PromptScores:
        """The prompt's per-token scores (`engine.scoring`), computed on the engine thread
        a chunk at a time between steps. Raises ParamError / EngineDeadError; cancelling stops the work."""
        job = await asyncio.to_thread(self._engine.make_scoring_job, request_id, prompt, top_k)
        if not self.accepting:
            raise EngineDeadError("the engine is shutting down" if self._draining else "the engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(_Score(job, loop, future))
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    def _detach(self, request_id: str) -> None:
        """Stop delivering outputs of a request (its stream is closed)."""
        self._queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to end a request and free its pages (idempotent)."""
        self._commands.put(_Abort(request_id))

    # --- the engine thread ----------------------------------------------------------
    def _loop(self) -> None:
        engine = self._engine
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not (engine.has_unfinished or self._scoring))
                if engine.has_unfinished:
                    self._deliver(engine.step())
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

    def _score_next_chunk(self) -> None:
        """One chunk of the oldest scoring job; a job that fails fails alone."""
        current = self._scoring[0]
        try:
            self._engine.run_scoring(current.job)
        except Exception as exc:
            log.exception("scoring %s failed", current.job.request_id)
            self._scoring.pop(0)
            _settle(current, exception=exc)
            return
        if current.job.done:
            self._scoring.pop(0)
            _settle(current, result=current.job.result())

    def _apply(self, command: _Add | _Abort | _Score) -> None:
        engine = self._engine
        if isinstance(command, _Score):
            self._scoring.append(command)
        elif isinstance(command, _Add):
            with self._pending_lock:
                self._pending -= 1
            if command.seq.request_id not in self._queues:
                return  # aborted before it reached the engine
            try:
                engine.add_sequence(command.seq)
            except Exception as exc:
                self._deliver([_error_output(command.seq, exc)])
        else:
            self._scoring = [s for s in self._scoring if s.job.request_id != command.request_id]
            out = engine.abort(command.request_id)
            if out is not None:
                self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._queues.get(out.request_id)
            if target is not None:
                loop, out_queue = target
                loop.call_soon_threadsafe(out_queue.put_nowait, out)

    def _fail_all(self, message: str) -> None:
        for pending in self._scoring:
            _settle(pending, exception=EngineDeadError(message))
        for request_id, (loop, out_queue) in list(self._queues.items()):
            out = RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ERROR, error=message)
            loop.call_soon_threadsafe(out_queue.put_nowait, out)


class RequestStream:
    """The outputs of one request, ending with a finished one.

    Closing it before the end (or dropping it) aborts the request, so a client
    that goes away frees its pages even if it never read an output.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, out_queue: asyncio.Queue):
        self.request_id = request_id
        self._engine, self._queue = engine, out_queue
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out: RequestOutput = await self._queue.get()
        except BaseException:  # cancelled while waiting: the client is gone
            await self.aclose()
            raise
        if out.finished:
            self._close(abort=False)
        return out

    async def aclose(self) -> None:
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        if self._done:
            return
        self._done = True
        if abort:
            self._engine.abort(self.request_id)
        self._engine._detach(self.request_id)

    def __del__(self) -> None:
        if not self._done:
            self._close(abort=True)


def _settle(score: _Score, result: PromptScores | None = None, exception: BaseException | None = None) -> None:
    """Complete a scoring future from the engine thread (unless its awaiter was cancelled)."""

    def settle() -> None:
        if score.future.done():
            return
        if exception is not None:
            score.future.set_exception(exception)
        else:
            score.future.set_result(result)

    score.loop.call_soon_threadsafe(settle)


def _error_output(seq: Sequence, exc: Exception) -> RequestOutput:
    return RequestOutput(
        seq.request_id, seq.prompt_ids, finished=True, finish_reason=FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}"
    )

"""Rank 0's handle on the worker processes: start them, send them plans, watch them, stop them.

Workers are spawned (a fresh interpreter each: CUDA cannot be forked), as
daemons, and stopped in every way the engine can end: `close()` asks them to
exit and waits; a failed step kills them (they may be blocked in a collective
that will never complete); and a finalizer stops them if the engine is
dropped or the interpreter exits without closing it. Workers ignore SIGINT
and SIGTERM (the server drains on them first), so stopping one by force is a
SIGKILL.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Callable

from unmask.engine.config import EngineConfig
from unmask.engine.errors import EngineDeadError
from unmask.engine.parallel.loading import ShardLoader
from unmask.engine.parallel.plan import Failed, Message, Shutdown, encode, receive
from unmask.engine.parallel.worker import WorkerSpec, worker_main

CLOSE_GRACE_SECONDS = 10.0


class WorkerGroup:
    """Ranks 1..N-1 of a tensor-parallel group, each in its own process, with a pipe from rank 0."""

    def __init__(self, config: EngineConfig, shards: ShardLoader):
        self._dir = tempfile.mkdtemp(prefix="unmask-tp-")
        self.init_file = os.path.join(self._dir, "rendezvous")  # torch.distributed's file store
        context = mp.get_context("spawn")
        self.processes: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        self.failure: str | None = None
        self._stopping = False
        self._stopper = weakref.finalize(self, _stop, self.processes, self.pipes, self._dir, CLOSE_GRACE_SECONDS)
        for rank in range(1, config.tensor_parallel_size):
            ours, theirs = context.Pipe()
            spec = WorkerSpec(rank, config, shards, self.init_file)
            process = context.Process(target=worker_main, args=(spec, theirs), name=f"unmask-tp-rank{rank}", daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)

    def wait_ready(self) -> None:
        """Wait until every worker has loaded its shard (raises if one failed)."""
        for process, pipe in zip(self.processes, self.pipes):
            message = self._next_message(process, pipe)
            if isinstance(message, Failed):
                raise self.fail(f"rank {message.rank} failed to start:\n{message.error}")

    def watch(self, on_death: Callable[[], None]) -> None:
        """Call `on_death` (on a thread of its own) as soon as a worker dies unasked."""

        def monitor() -> None:
            wait([p.sentinel for p in self.processes])
            if not self._stopping and self.failure is None:
                on_death()

        threading.Thread(target=monitor, name="unmask-tp-monitor", daemon=True).start()

    def send(self, message: Message) -> None:
        """The same message to every worker."""
        if self.failure is not None:
            raise EngineDeadError(f"the tensor-parallel group has failed: {self.failure}")
        data = encode(message)
        try:
            for pipe in self.pipes:
                pipe.send_bytes(data)
        except OSError as exc:
            raise self.fail(f"a worker is gone ({exc})") from exc

    def fail(self, reason: str) -> EngineDeadError:
        """Mark the group dead and kill the workers now; returns the error for the engine to raise."""
        reports = [m.error for m in self._pending_messages() if isinstance(m, Failed)]
        self.failure = self.failure or "\n".join([reason, *reports])
        self._stopping = True
        self._stopper.detach()
        _stop(self.processes, self.pipes, self._dir, grace=0.0)
        return EngineDeadError(f"the tensor-parallel group has failed: {self.failure}")

    def request_stop(self) -> None:
        """Ask every worker to leave the group and exit (without waiting)."""
        self._stopping = True
        _send_shutdown(self.pipes)

    def close(self) -> None:
        """Ask every worker to exit, wait for them (killing any that hang), release the rendezvous."""
        self._stopping = True
        if self._stopper.detach() is not None:
            _stop(self.processes, self.pipes, self._dir, CLOSE_GRACE_SECONDS)

    def _next_message(self, process: BaseProcess, pipe: Connection) -> Message:
        """The worker's next message; a worker that died without one counts as `Failed`."""
        wait([pipe, process.sentinel])
        try:
            return receive(pipe)
        except (EOFError, OSError):
            process.join()
            return Failed(self.processes.index(process) + 1, f"the process exited with code {process.exitcode}")

    def _pending_messages(self) -> list[Message]:
        messages = []
        for pipe in self.pipes:
            try:
                while pipe.poll():
                    messages.append(receive(pipe))
            except (EOFError, OSError):
                pass
        return messages


def _send_shutdown(pipes: list[Connection]) -> None:
    for pipe in pipes:
        try:
            pipe.send_bytes(encode(Shutdown()))
        except OSError:  # that worker is gone already
            pass


def _stop(processes: list[BaseProcess], pipes: list[Connection], directory: str, grace: float) -> None:
    """Ask the workers to exit; after `grace` seconds kill the ones still running."""
    _send_shutdown(pipes)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    for pipe in pipes:
        pipe.close()
    shutil.rmtree(directory, ignore_errors=True)

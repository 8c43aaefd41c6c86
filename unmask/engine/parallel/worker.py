"""A tensor-parallel worker: rank r > 0 in a process of its own, running the steps rank 0 plans.

Its life: load its shard, say `Ready`, join the group when rank 0 says `Join`, then run each
`StepPlan` that arrives until `Shutdown` (or until the engine's end of the
pipe closes). It never decides anything: scheduling, sampling inputs and
commits are rank 0's. It exits on its own when the engine process dies, even
in the middle of a collective that can no longer complete.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from unmask.engine.config import EngineConfig
from unmask.engine.parallel.loading import ShardLoader
from unmask.engine.parallel.plan import Failed, Join, Ready, Shutdown, encode, receive
from unmask.engine.parallel.rank import RankModel, join, kv_pages, run_step
from unmask.engine.parallel.state import ParallelState, rank_device

_PARENT_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process starts from (pickled to it)."""

    rank: int
    config: EngineConfig
    shards: ShardLoader
    init_file: str


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """The worker process's entry point."""
    # Ctrl-C in a terminal, or a service manager's SIGTERM, reaches every process of the group;
    # the engine drains its requests first, then stops us (or we follow it when it dies).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _exit_with_parent()
    state = ParallelState(spec.rank, spec.config.tensor_parallel_size, rank_device(spec.config.device, spec.rank))
    try:
        state.select_device()
        loaded = spec.shards.load(state)
        pages = kv_pages(loaded, spec.config)
        conn.send_bytes(encode(Ready(spec.rank)))
        if isinstance(receive(conn), Join):  # else `Shutdown`: the engine failed to start
            rank = join(state, loaded, spec.config, spec.init_file, pages)
            _serve(conn, rank)
            rank.release_graphs()
    except Exception:
        _report(conn, Failed(spec.rank, traceback.format_exc()))
        os._exit(1)  # no teardown of the group: it would wait for the other ranks, which wait for this one
    state.leave()  # with rank 0, which leaves when it sends `Shutdown`


def _serve(conn: Connection, rank: RankModel) -> None:
    while True:
        try:
            message = receive(conn)
        except EOFError:  # the engine closed its end without a word: it is gone
            return
        if isinstance(message, Shutdown):
            return
        run_step(rank, message)


def _report(conn: Connection, message: Failed) -> None:
    try:
        conn.send_bytes(encode(message))
    except OSError:  # the engine is gone already
        pass


def _exit_with_parent() -> None:
    """Exit when the engine process dies, whatever the main thread is blocked in."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="unmask-tp-parent-watch", daemon=True).start()

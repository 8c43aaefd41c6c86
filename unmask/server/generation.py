"""The engine requests behind one HTTP request: started together, merged, aborted together.

An HTTP request becomes one engine request per choice (`n` per prompt).
`Generation.start` adds them all or none; `events` yields their outputs in
arrival order and stops early if the client disconnects; `close` aborts
whatever has not finished, so a client that leaves always frees its pages.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request

from unmask.engine.infill import Infill
from unmask.engine.outputs import FinishReason, RequestOutput
from unmask.engine.params import SamplingParams
from unmask.server.errors import engine_failure, from_engine_exception
from unmask.server.metrics import Metrics


class ClientDisconnected(Exception):
    """The HTTP client went away; the generation has been aborted."""


@dataclass
class ChoiceRequest:
    """One engine request: the prompt and parameters of one choice."""

    request_id: str
    prompt: str | list[int] | Infill
    params: SamplingParams
    cache: str  # resolved policy names, for metric labels
    unmask: str


class DisconnectWatcher:
    """Completes when the client closes its connection (the ASGI `http.disconnect` message).

    The request body must already have been read: from then on `receive`
    returns only when the client goes away (or the response is complete).
    """

    def __init__(self, request: Request):
        self.task = asyncio.ensure_future(self._wait(request))

    @staticmethod
    async def _wait(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @property
    def disconnected(self) -> bool:
        return self.task.done() and not self.task.cancelled()

    def stop(self) -> None:
        self.task.cancel()


@dataclass
class Generation:
    engine: object
    choices: list[ChoiceRequest]
    metrics: Metrics
    arrival: float  # time.perf_counter() when the HTTP request arrived
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _pumps: list[asyncio.Task] = field(default_factory=list)
    _unfinished: set[int] = field(default_factory=set)
    _got_text: set[int] = field(default_factory=set)
    _last: dict[int, RequestOutput] = field(default_factory=dict)

    @classmethod
    async def start(
        cls, engine, choices: list[ChoiceRequest], metrics: Metrics, arrival: float, retry_after: int
    ) -> "Generation":
        """Add every choice to the engine, or none: on the first refusal, abort the rest and raise `APIError`."""
        gen = cls(engine, choices, metrics, arrival)
        streams = []
        try:
            for choice in choices:
                streams.append(await engine.add_request(choice.request_id, choice.prompt, choice.params))
        except Exception as exc:
            raise from_engine_exception(exc, retry_after) from exc
        finally:
            if len(streams) < len(choices):  # refused, or cancelled while a prompt was being tokenized
                for added in choices[: len(streams)]:
                    _abort(engine, added.request_id)
        gen._unfinished = set(range(len(choices)))
        gen._pumps = [asyncio.ensure_future(gen._pump(i, s)) for i, s in enumerate(streams)]
        return gen

    async def _pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        async for out in stream:
            await self._queue.put((index, out))

    async def events(self, watcher: DisconnectWatcher) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (choice index, output) until every choice has finished.

        Raises `ClientDisconnected` (after aborting) if the client goes away first.
        """
        while self._unfinished:
            getter = asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait({getter, watcher.task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                self.close()
                raise ClientDisconnected()
            index, out = getter.result()
            self._observe(index, out)
            yield index, out

    def _observe(self, index: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        self._last[index] = out
        if out.delta_text and index not in self._got_text:
            self._got_text.add(index)
            self.metrics.observe_first_text(now - self.arrival)
        if out.finished:
            self._unfinished.discard(index)
            choice = self.choices[index]
            self.metrics.observe_finished(out, choice.cache, choice.unmask, now - self.arrival)

    async def collect(self, watcher: DisconnectWatcher) -> list[RequestOutput]:
        """Wait for every choice's final output (in choice order).

        Raises the 500 `APIError` as soon as one choice fails in the engine: the
        response is an error anyway, so the rest are aborted rather than awaited.
        """
        finals: list[RequestOutput | None] = [None] * len(self.choices)
        async for index, out in self.events(watcher):
            if out.finished:
                finals[index] = out
                if out.finish_reason is FinishReason.ERROR:
                    self.close()
                    raise engine_failure(out.error)
        return finals  # type: ignore[return-value]

    def close(self) -> None:
        """Abort every unfinished choice. Synchronous and idempotent: safe in `finally` under cancellation."""
        for task in self._pumps:
            task.cancel()
        for index in sorted(self._unfinished):
            _abort(self.engine, self.choices[index].request_id)
            self._record_abort(index)
        self._unfinished.clear()

    def _record_abort(self, index: int) -> None:
        choice = self.choices[index]
        last = self._last.get(index)
        out = RequestOutput(
            choice.request_id,
            last.prompt_token_ids if last else [],
            token_ids=last.token_ids if last else [],
            finished=True,
            finish_reason=FinishReason.ABORT,
        )
        if last is not None:
            out.stats = last.stats
        self.metrics.observe_finished(out, choice.cache, choice.unmask, time.perf_counter() - self.arrival)


def _abort(engine, request_id: str) -> None:
    """`engine.abort` may be sync or async; never wait for it (we may be inside a cancelled scope)."""
    result = engine.abort(request_id)
    if inspect.isawaitable(result):
        asyncio.ensure_future(result)

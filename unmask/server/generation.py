"""The engine request group behind one HTTP request: started together, read as one stream, aborted together.

An HTTP request becomes one engine request per choice (`n` per prompt), all
queued as one group or none (`Generation.start`). `events` reads the group's
one output stream and stops early if the client disconnects; `close` closes
that stream, which aborts whatever has not finished, so a client that leaves
always frees its pages.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request

from unmask.engine.client import EngineClient, GroupMember, OutputStream
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
    """Interrupts an engine output stream (a generation's, or a scoring group's) when the client
    closes its connection (ASGI `http.disconnect`).

    The request body must already have been read: from then on `receive`
    returns only when the client goes away (or the response is complete).
    `stop` cancels the watching task; it is the only task a request runs beside its own.
    """

    def __init__(self, request: Request, stream: OutputStream):
        self.task = asyncio.ensure_future(self._wait(request, stream))

    @staticmethod
    async def _wait(request: Request, stream: OutputStream) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.interrupt(ClientDisconnected())

    def stop(self) -> None:
        self.task.cancel()


@dataclass
class Generation:
    stream: OutputStream[RequestOutput]
    choices: list[ChoiceRequest]
    metrics: Metrics
    arrival: float  # time.perf_counter() when the HTTP request arrived
    _unfinished: set[int] = field(default_factory=set)
    _got_text: set[int] = field(default_factory=set)
    _last: dict[int, RequestOutput] = field(default_factory=dict)

    @classmethod
    async def start(
        cls, engine: EngineClient, choices: list[ChoiceRequest], metrics: Metrics, arrival: float, retry_after: int
    ) -> "Generation":
        """Queue every choice in the engine, or none: a refusal raises `APIError`."""
        members = [GroupMember(c.request_id, c.prompt, c.params) for c in choices]
        try:
            stream = await engine.add_group(members)
        except Exception as exc:
            raise from_engine_exception(exc, retry_after) from exc
        return cls(stream, choices, metrics, arrival, set(range(len(choices))))

    def watch(self, request: Request) -> DisconnectWatcher:
        return DisconnectWatcher(request, self.stream)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (choice index, output) until every choice has finished.

        Raises `ClientDisconnected` if the client goes away first, and `APIError`
        (503) if the engine stops serving the request (shutdown); the stream is closed then.
        """
        try:
            async for index, out in self.stream:
                self._observe(index, out)
                yield index, out
        except ClientDisconnected:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise from_engine_exception(exc, retry_after_seconds=0) from exc

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

    async def collect(self) -> list[RequestOutput]:
        """Wait for every choice's final output (in choice order).

        Raises the 500 `APIError` as soon as one choice fails in the engine: the
        response is an error anyway, so the rest are aborted rather than awaited.
        """
        finals: list[RequestOutput | None] = [None] * len(self.choices)
        async for index, out in self.events():
            if out.finished:
                finals[index] = out
                if out.finish_reason is FinishReason.ERROR:
                    self.close()
                    raise engine_failure(out.error)
        return finals  # type: ignore[return-value]

    def close(self) -> None:
        """Abort every unfinished choice. Synchronous and idempotent: safe in `finally` under cancellation."""
        self.stream.close()
        for index in sorted(self._unfinished):
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

"""From a started `Generation` to the HTTP response: one JSON body, or an SSE stream of chunks.

The two generation endpoints differ only in the objects they build (a `Reply`
subclass each); waiting, streaming, the usage chunk, the error event and the
clean-up on disconnect are here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import AsyncIterator, ClassVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from unmask.engine.outputs import RequestOutput
from unmask.server import translate
from unmask.server.errors import UNAVAILABLE, APIError
from unmask.server.generation import ClientDisconnected, DisconnectWatcher, Generation
from unmask.server.http_metrics import CLIENT_CLOSED
from unmask.server.protocol import BlockState, ChatCompletionRequest, CompletionRequest, UsageInfo
from unmask.server.streaming import DONE, sse_event, sse_response


class Reply(ABC):
    """Builds the response objects of one request (shared id, timestamp and model).

    Subclasses name their response and chunk types and build the choices.
    """

    response_type: ClassVar[type[BaseModel]]
    chunk_type: ClassVar[type[BaseModel]]

    def __init__(self, request_id: str, created: int, model: str, n: int):
        self.id, self.created, self.model, self.n = request_id, created, model, n

    @abstractmethod
    def choice(self, index: int, out: RequestOutput, finish_reason: str | None) -> BaseModel:
        """The choice of a finished output in the plain response."""

    def opening(self) -> list[BaseModel]:
        """Chunk choices streamed before any output (none by default)."""
        return []

    @abstractmethod
    def delta(self, index: int, text: str, finish_reason: str | None, block: BlockState | None) -> BaseModel:
        """The chunk choice streamed for one output."""

    def response(self, finals: list[RequestOutput]) -> BaseModel:
        choices = [self.choice(i, out, translate.finish_reason(out)) for i, out in enumerate(finals)]
        usage = translate.usage(finals, self.n)
        return self.response_type(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def chunk(self, choices: list[BaseModel], usage: UsageInfo | None = None) -> bytes:
        return sse_event(
            self.chunk_type(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )


async def respond(
    request: Request, gen: Generation, reply: Reply, body: CompletionRequest | ChatCompletionRequest
) -> Response:
    """Stream the generation's chunks, or wait for every choice and return the whole response."""
    watcher = gen.watch(request)
    headers = {"X-Request-Id": reply.id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(gen, watcher, reply, include_usage), headers)
    try:
        finals = await gen.collect()
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        gen.close()
        watcher.stop()
    return json_response(reply.response(finals), headers)


def json_response(payload: BaseModel, headers: dict[str, str]) -> Response:
    """`payload` as a JSON body, encoded once by pydantic's serializer (not dumped to dicts and
    then encoded again by `json`, which for a long completion with logprobs costs the event loop)."""
    return Response(payload.model_dump_json(), media_type="application/json", headers=headers)


async def _stream(
    gen: Generation, watcher: DisconnectWatcher, reply: Reply, include_usage: bool
) -> AsyncIterator[bytes]:
    finals: list[RequestOutput | None] = [None] * len(gen.choices)
    try:
        for choice in reply.opening():
            yield reply.chunk([choice])
        async for index, out in gen.events():
            reason = translate.finish_reason(out)
            block = translate.block_state(out.block)
            if out.delta_text or block is not None or reason is not None:
                yield reply.chunk([reply.delta(index, out.delta_text, reason, block)])
            if out.finished:
                finals[index] = out
        if include_usage:
            yield reply.chunk([], translate.usage(finals, reply.n))  # type: ignore[arg-type]
        yield DONE
    except APIError as error:  # the engine failed on this request, or stopped serving it, after the stream began
        yield error.sse_event()
        if error.type == UNAVAILABLE:  # shutdown: the stream still ends as OpenAI streams end
            yield DONE
    except ClientDisconnected:
        pass
    finally:
        gen.close()
        watcher.stop()

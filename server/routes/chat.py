"""POST /v1/chat/completions: chat through the checkpoint's chat template, plain or streamed."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from engine.outputs import RequestOutput
from server import translate
from server.errors import APIError
from server.generation import ClientDisconnected, DisconnectWatcher, Generation
from server.http_metrics import CLIENT_CLOSED
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
)
from server.routes.docs import GENERATION_ERRORS, streaming_200
from server.state import get_state, new_request_id
from server.streaming import DONE, sse_event, sse_response

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        **streaming_200("ChatCompletionChunk", "The chat completion (JSON), or its SSE stream."),
        **GENERATION_ERRORS,
    },
    summary="Create a chat completion",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    model = state.check_model(body.model)
    engine = state.engine
    translate.check_choice_count(1, body.n, engine.config.max_waiting)
    prompt_ids = translate.chat_prompt_ids(engine.tokenizer, body.messages)
    max_tokens = translate.chat_max_tokens(body, len(prompt_ids), engine.max_model_len, state.settings.chat_max_tokens)
    request_id = new_request_id("chatcmpl")
    choices = translate.choice_requests(request_id, [prompt_ids], body, max_tokens, state.settings.defaults)
    gen = Generation.start(engine, choices, state.metrics, arrival, state.settings.retry_after_seconds)
    watcher = DisconnectWatcher(request)
    reply = _Reply(request_id, int(time.time()), model, body.n)
    headers = {"X-Request-Id": request_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(gen, watcher, reply, include_usage), headers)
    try:
        finals = await gen.collect(watcher)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        gen.close()
        watcher.stop()
    return JSONResponse(reply.response(finals).model_dump(mode="json"), headers=headers)


class _Reply:
    """Builds the response objects of one request (shared id, timestamp and model)."""

    def __init__(self, request_id: str, created: int, model: str, n: int):
        self.id, self.created, self.model, self.n = request_id, created, model, n

    def response(self, finals: list[RequestOutput]) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=out.text), finish_reason=translate.finish_reason(out))
            for i, out in enumerate(finals)
        ]
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=translate.usage(finals, self.n)
        )

    def chunk(self, choices: list[ChatChunkChoice], usage=None) -> bytes:
        return sse_event(
            ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )


async def _stream(
    gen: Generation, watcher: DisconnectWatcher, reply: _Reply, include_usage: bool
) -> AsyncIterator[bytes]:
    finals: list[RequestOutput | None] = [None] * len(gen.choices)
    try:
        for i in range(len(gen.choices)):  # the role comes first, before any content, as OpenAI sends it
            yield reply.chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        async for index, out in gen.events(watcher):
            reason = translate.finish_reason(out)
            block = translate.block_state(out.block)
            if out.delta_text or block is not None or reason is not None:
                delta = ChatDelta(content=out.delta_text or None)
                yield reply.chunk([ChatChunkChoice(index=index, delta=delta, finish_reason=reason, block=block)])
            if out.finished:
                finals[index] = out
        if include_usage:
            yield reply.chunk([], translate.usage(finals, reply.n))  # type: ignore[arg-type]
        yield DONE
    except APIError as error:  # the engine failed on this request after the stream began
        yield error.sse_event()
    except ClientDisconnected:
        pass
    finally:
        gen.close()
        watcher.stop()

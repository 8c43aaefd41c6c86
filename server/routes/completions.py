"""POST /v1/completions: text completion, plain or streamed."""

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
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
)
from server.routes.docs import GENERATION_ERRORS, streaming_200
from server.state import get_state, new_request_id
from server.streaming import DONE, sse_event, sse_response

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**streaming_200("CompletionChunk", "The completion (JSON), or its SSE stream."), **GENERATION_ERRORS},
    summary="Create a completion",
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state = get_state(request)
    model = state.check_model(body.model)
    prompts = translate.completion_prompts(body.prompt)
    translate.check_choice_count(len(prompts), body.n, state.engine.config.max_waiting)
    max_tokens = body.max_tokens if body.max_tokens is not None else state.settings.completion_max_tokens
    request_id = new_request_id("cmpl")
    choices = translate.choice_requests(request_id, prompts, body, max_tokens, state.settings.defaults)
    gen = Generation.start(state.engine, choices, state.metrics, arrival, state.settings.retry_after_seconds)
    watcher = DisconnectWatcher(request)
    echoes = [_echo_text(state.engine.tokenizer, c.prompt) for c in choices] if body.echo else None
    reply = _Reply(request_id, int(time.time()), model, body.n, echoes)
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


def _echo_text(tokenizer, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)


class _Reply:
    """Builds the response objects of one request (shared id, timestamp and model)."""

    def __init__(self, request_id: str, created: int, model: str, n: int, echoes: list[str] | None):
        self.id, self.created, self.model, self.n, self.echoes = request_id, created, model, n, echoes

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=i,
                text=(self.echoes[i] if self.echoes else "") + out.text,
                finish_reason=translate.finish_reason(out),
            )
            for i, out in enumerate(finals)
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=translate.usage(finals, self.n)
        )

    def chunk(self, choices: list[CompletionChunkChoice], usage=None) -> bytes:
        return sse_event(
            CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )


async def _stream(
    gen: Generation, watcher: DisconnectWatcher, reply: _Reply, include_usage: bool
) -> AsyncIterator[bytes]:
    finals: list[RequestOutput | None] = [None] * len(gen.choices)
    try:
        for i, echo in enumerate(reply.echoes or []):
            yield reply.chunk([CompletionChunkChoice(index=i, text=echo)])
        async for index, out in gen.events(watcher):
            reason = translate.finish_reason(out)
            block = translate.block_state(out.block)
            if out.delta_text or block is not None or reason is not None:
                choice = CompletionChunkChoice(index=index, text=out.delta_text, finish_reason=reason, block=block)
                yield reply.chunk([choice])
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

"""POST /v1/completions: text completion, plain or streamed."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from unmask.engine.infill import Infill
from unmask.engine.outputs import RequestOutput
from unmask.server import translate
from unmask.server.generation import Generation
from unmask.server.json_body import JSONBodyRoute
from unmask.server.protocol import (
    BlockState,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
)
from unmask.server.reply import Reply, respond
from unmask.server.routes.docs import GENERATION_ERRORS, streaming_200
from unmask.server.state import get_state, new_request_id

router = APIRouter(route_class=JSONBodyRoute)


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
    if body.suffix is not None:  # insert mode: the canvas goes between each prompt and the suffix
        prompts = [Infill((prompt, body.suffix), (max_tokens,)) for prompt in prompts]
    request_id = new_request_id("cmpl")
    choices = translate.choice_requests(request_id, prompts, body, max_tokens, state.settings.defaults)
    gen = await Generation.start(state.engine, choices, state.metrics, arrival, state.settings.retry_after_seconds)
    # On the event loop, but cheap: the engine has accepted every prompt, so none is longer than the context.
    echoes = [_echo_text(state.engine.tokenizer, c.prompt) for c in choices] if body.echo else None
    return await respond(request, gen, _CompletionReply(request_id, int(time.time()), model, body.n, echoes), body)


def _echo_text(tokenizer, prompt: str | list[int] | Infill) -> str:
    if isinstance(prompt, Infill):
        prompt = prompt.pieces[0]
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)


class _CompletionReply(Reply):
    response_type = CompletionResponse
    chunk_type = CompletionChunk

    def __init__(self, request_id: str, created: int, model: str, n: int, echoes: list[str] | None):
        super().__init__(request_id, created, model, n)
        self.echoes = echoes

    def choice(self, index: int, out: RequestOutput, finish_reason: str | None) -> CompletionChoice:
        text = (self.echoes[index] if self.echoes else "") + out.text
        return CompletionChoice(index=index, text=text, finish_reason=finish_reason)

    def opening(self) -> list[CompletionChunkChoice]:
        return [CompletionChunkChoice(index=i, text=echo) for i, echo in enumerate(self.echoes or [])]

    def delta(
        self, index: int, text: str, finish_reason: str | None, block: BlockState | None
    ) -> CompletionChunkChoice:
        return CompletionChunkChoice(index=index, text=text, finish_reason=finish_reason, block=block)

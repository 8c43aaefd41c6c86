"""POST /v1/chat/completions: chat through the checkpoint's chat template, plain or streamed."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from unmask.engine.outputs import RequestOutput
from unmask.server import translate
from unmask.server.generation import Generation
from unmask.server.json_body import JSONBodyRoute
from unmask.server.logprobs import chat_logprobs, generated_logprobs
from unmask.server.protocol import (
    AssistantMessage,
    BlockState,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
)
from unmask.server.reply import Reply, respond
from unmask.server.routes.docs import GENERATION_ERRORS, streaming_200
from unmask.server.state import get_state, new_request_id

router = APIRouter(route_class=JSONBodyRoute)


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
    # Off the event loop: rendering and tokenizing megabytes of messages would stall every other request.
    prompt_ids = await asyncio.to_thread(translate.chat_prompt_ids, engine.tokenizer, body.messages)
    max_tokens = translate.chat_max_tokens(body, len(prompt_ids), engine.max_model_len, state.settings.chat_max_tokens)
    request_id = new_request_id("chatcmpl")
    choices = translate.choice_requests(request_id, [prompt_ids], body, max_tokens, state.settings.defaults)
    gen = await Generation.start(engine, choices, state.metrics, arrival, state.settings.retry_after_seconds)
    return await respond(request, gen, _ChatReply(request_id, int(time.time()), model, body.n, engine.tokenizer), body)


class _ChatReply(Reply):
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

    def __init__(self, request_id: str, created: int, model: str, n: int, tokenizer):
        super().__init__(request_id, created, model, n)
        self.tokenizer = tokenizer

    def choice(self, index: int, out: RequestOutput, finish_reason: str | None) -> ChatChoice:
        logprobs = None
        if out.logprobs is not None:
            logprobs = chat_logprobs(self.tokenizer, generated_logprobs(out, self.tokenizer, include_end=False))
        return ChatChoice(
            index=index, message=AssistantMessage(content=out.text), logprobs=logprobs, finish_reason=finish_reason
        )

    def opening(self) -> list[ChatChunkChoice]:
        # The role comes first, before any content, as OpenAI sends it (one prompt: n choices).
        return [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(self.n)]

    def delta(self, index: int, text: str, finish_reason: str | None, block: BlockState | None) -> ChatChunkChoice:
        delta = ChatDelta(content=text or None)
        return ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, block=block)

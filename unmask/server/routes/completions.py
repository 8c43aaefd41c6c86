"""POST /v1/completions: text completion, plain or streamed."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from unmask.engine.infill import Infill
from unmask.engine.outputs import FinishReason, PromptScores, RequestOutput
from unmask.server import translate
from unmask.server.generation import ChoiceRequest, ClientDisconnected, Generation
from unmask.server.http_metrics import CLIENT_CLOSED
from unmask.server.json_body import JSONBodyRoute
from unmask.server.logprobs import Segment, completion_logprobs, generated_logprobs
from unmask.server.protocol import (
    BlockState,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
)
from unmask.server.reply import Reply, json_response, respond
from unmask.server.routes.docs import GENERATION_ERRORS, streaming_200
from unmask.server.scoring import check_scoring_request, score_prompts
from unmask.server.state import ServerState, get_state, new_request_id

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
    request_id = new_request_id("cmpl")
    translate.requested_logprobs(body)  # refuses a bad combination before any work
    scores = None
    if check_scoring_request(body, max_tokens):  # with a suffix too, only the prompt is scored (it is what is echoed)
        retry_after = state.settings.retry_after_seconds
        try:
            scores = await score_prompts(state.engine, request, request_id, prompts, body.logprobs, retry_after)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
    if body.suffix is not None:  # insert mode: the canvas goes between each prompt and the suffix
        prompts = [Infill((prompt, body.suffix), (max_tokens,)) for prompt in prompts]
    # With max_tokens 0 nothing is generated: the choices then only carry their ids and prompts.
    choices = translate.choice_requests(request_id, prompts, body, max(max_tokens, 1), state.settings.defaults)
    if max_tokens == 0:
        reply = _reply(state, body, request_id, model, choices, scores)
        finals = [_nothing_generated(c, scores[i // body.n]) for i, c in enumerate(choices)]  # type: ignore[index]
        return json_response(reply.response(finals), {"X-Request-Id": request_id})
    gen = await Generation.start(state.engine, choices, state.metrics, arrival, state.settings.retry_after_seconds)
    return await respond(request, gen, _reply(state, body, request_id, model, choices, scores), body)


def _reply(
    state: ServerState,
    body: CompletionRequest,
    request_id: str,
    model: str,
    choices: list[ChoiceRequest],
    scores: list[PromptScores] | None,
) -> _CompletionReply:
    tokenizer = state.engine.tokenizer
    # On the event loop, but cheap: the engine has accepted (or scored) every prompt, so none is longer than the context.
    echoes = [_echo_text(tokenizer, c.prompt) for c in choices] if body.echo else None
    return _CompletionReply(request_id, int(time.time()), model, body.n, echoes, tokenizer, scores)


def _nothing_generated(choice: ChoiceRequest, scores: PromptScores) -> RequestOutput:
    """The final output of a choice with max_tokens 0: the scored prompt and no tokens."""
    return RequestOutput(choice.request_id, scores.token_ids, finished=True, finish_reason=FinishReason.LENGTH, logprobs=[])


def _echo_text(tokenizer, prompt: str | list[int] | Infill) -> str:
    if isinstance(prompt, Infill):
        prompt = prompt.pieces[0]
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)


class _CompletionReply(Reply):
    response_type = CompletionResponse
    chunk_type = CompletionChunk

    def __init__(
        self,
        request_id: str,
        created: int,
        model: str,
        n: int,
        echoes: list[str] | None,
        tokenizer,
        scores: list[PromptScores] | None,
    ):
        super().__init__(request_id, created, model, n)
        self.echoes, self.tokenizer, self.scores = echoes, tokenizer, scores

    def choice(self, index: int, out: RequestOutput, finish_reason: str | None) -> CompletionChoice:
        echo = self.echoes[index] if self.echoes else ""
        return CompletionChoice(
            index=index, text=echo + out.text, logprobs=self._logprobs(index, out, len(echo)), finish_reason=finish_reason
        )

    def _logprobs(self, index: int, out: RequestOutput, generated_start: int):
        """With echo, the prompt's scores first (the first token's is null), then the generated tokens'."""
        if out.logprobs is None:
            return None
        segments = []
        if self.scores is not None:
            prompt = self.scores[index // self.n]
            segments.append(Segment(0, list(zip(prompt.token_ids, prompt.logprobs)), text_has_special_tokens=True))
        generated = generated_logprobs(out, self.tokenizer, include_end=True)
        segments.append(Segment(generated_start, [(e.token_id, e) for e in generated], text_has_special_tokens=False))
        return completion_logprobs(self.tokenizer, segments)

    def opening(self) -> list[CompletionChunkChoice]:
        return [CompletionChunkChoice(index=i, text=echo) for i, echo in enumerate(self.echoes or [])]

    def delta(
        self, index: int, text: str, finish_reason: str | None, block: BlockState | None
    ) -> CompletionChunkChoice:
        return CompletionChunkChoice(index=index, text=text, finish_reason=finish_reason, block=block)

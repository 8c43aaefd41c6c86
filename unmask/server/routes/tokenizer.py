"""POST /tokenize, POST /detokenize, GET /tokenizer_info: the served model's tokenizer, as vLLM serves it."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from unmask.engine.params import ParamError, check_text
from unmask.server import translate
from unmask.server.errors import INVALID_REQUEST, APIError
from unmask.server.json_body import JSONBodyRoute
from unmask.server.routes.docs import error_responses
from unmask.server.state import get_state
from unmask.server.tokenization import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

router = APIRouter(route_class=JSONBodyRoute)

_SPECIAL_TOKENS = ("eos_token", "bos_token", "pad_token", "unk_token", "mask_token")


@router.post(
    "/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 401, 404, 413), summary="Tokenize text or a chat"
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    _check_one_input(body)
    tokenizer = state.engine.tokenizer
    # Off the event loop: a body of megabytes takes long to tokenize.
    tokens = await asyncio.to_thread(_token_ids, tokenizer, body)
    strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=state.engine.max_model_len, tokens=tokens, token_strs=strs)


def _check_one_input(body: TokenizeRequest) -> None:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give exactly one of prompt (text) and messages (a chat).", INVALID_REQUEST, "prompt")
    if body.messages is not None and body.continue_final_message and body.add_generation_prompt:
        raise APIError(
            400,
            "continue_final_message and add_generation_prompt cannot both be true.",
            INVALID_REQUEST,
            "continue_final_message",
            "invalid_value",
        )


def _token_ids(tokenizer, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        return translate.chat_prompt_ids(
            tokenizer, body.messages, body.add_generation_prompt, body.continue_final_message, bool(body.add_special_tokens)
        )
    assert body.prompt is not None
    try:
        check_text("prompt", body.prompt)
    except ParamError as exc:
        raise APIError(400, exc.message, INVALID_REQUEST, exc.param, "invalid_value") from None
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    return tokenizer.encode(body.prompt, add_special_tokens=add_special)


@router.post(
    "/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 401, 404, 413), summary="Detokenize token ids"
)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    state.check_model(body.model)
    tokenizer = state.engine.tokenizer
    bad = [t for t in body.tokens if t >= len(tokenizer)]
    if bad:
        raise APIError(
            400, f"token ids must be in [0, {len(tokenizer)}); got {bad[:3]}", INVALID_REQUEST, "tokens", "invalid_value"
        )
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))


@router.get(
    "/tokenizer_info", response_model=TokenizerInfo, responses=error_responses(401), summary="The tokenizer's configuration"
)
async def tokenizer_info(request: Request) -> TokenizerInfo:
    state = get_state(request)
    tokenizer = state.engine.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tokenizer).__name__,
        chat_template=getattr(tokenizer, "chat_template", None),
        model_max_length=state.engine.max_model_len,
        **{name: getattr(tokenizer, name, None) for name in _SPECIAL_TOKENS},
    )

"""Protocol <-> engine, in one place: requests become `SamplingParams` and prompts; outputs become choices.

Nothing here does I/O; routes call these functions and stream or return the result.
"""

from __future__ import annotations

from unmask.engine.infill import Infill
from unmask.engine.outputs import BlockView, FinishReason, RequestOutput
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams, check_text
from unmask.server.errors import (
    INVALID_REQUEST,
    SERVER_ERROR,
    APIError,
    engine_failure,
)
from unmask.server.generation import ChoiceRequest
from unmask.server.protocol import (
    METHOD_FIELD_NAMES,
    BlockState,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    UsageInfo,
)

MASK_PLACEHOLDER = "\u2591"  # "░": one per still-masked token in a streamed block's text

_DEFAULTS = SamplingParams()


# --- requests -------------------------------------------------------------------------------------


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The stop strings as a list (the protocol has checked their number and that none is empty)."""
    return [stop] if isinstance(stop, str) else list(stop or [])


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, choice: int) -> SamplingParams:
    """The engine parameters of choice `choice` of a request (choice i samples with seed + i)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_DEFAULTS.temperature if body.temperature is None else body.temperature,
        top_p=_DEFAULTS.top_p if body.top_p is None else body.top_p,
        top_k=_DEFAULTS.top_k if body.top_k is None else body.top_k,
        min_p=_DEFAULTS.min_p if body.min_p is None else body.min_p,
        logprobs=requested_logprobs(body),
        seed=None if body.seed is None else body.seed + choice,
        stop=stop_strings(body.stop),
        ignore_eos=body.ignore_eos,
        block_length=body.block_length,
        steps=body.steps,
        cache=body.cache,
        unmask=body.unmask,
        confidence=body.confidence,
        schedule=body.schedule,
        block_start=body.block_start,
        stream_blocks=body.stream and body.stream_blocks,  # per-step outputs are useless without a stream
        **{name: getattr(body, name) for name in METHOD_FIELD_NAMES},
    )


def requested_logprobs(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Alternatives per generated token the request asks for; None when it asks for no logprobs.

    Streamed responses carry no logprobs (deltas are text, finalized in bursts), so that pair is refused.
    """
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true.", INVALID_REQUEST, "top_logprobs", "invalid_value")
        wanted = (body.top_logprobs or 0) if body.logprobs else None
    else:
        wanted = body.logprobs
    if wanted is not None and body.stream:
        raise APIError(
            400, "logprobs are not supported with stream: true.", INVALID_REQUEST, "logprobs", "unsupported_parameter"
        )
    return wanted


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The separate prompts of a completion request (a list of ints is one tokenized prompt)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def check_choice_count(num_prompts: int, n: int, max_waiting: int) -> None:
    """Refuse, before any per-choice work, a request with more choices than the waiting queue holds.

    Such a request could never be queued, so a 429 (retry later) would be a lie; and a
    body of a million one-character prompts times n must cost nothing to refuse.
    """
    if num_prompts * n > max_waiting:
        raise APIError(
            400,
            f"This request asks for {num_prompts * n} completions ({num_prompts} prompts x n={n}); "
            f"the server queues at most {max_waiting} at once.",
            INVALID_REQUEST,
            "prompt" if num_prompts > 1 else "n",
            "too_many_choices",
        )


def chat_prompt_ids(
    tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
) -> list[int]:
    """Render the conversation with the checkpoint's chat template, by default ready for the assistant's turn.

    The template writes the special tokens a chat needs; `add_special_tokens` adds the tokenizer's own on top.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "This model has no chat template; use /v1/completions.",
            INVALID_REQUEST,
            "messages",
            "no_chat_template",
        )
    conversation = [{"role": _template_role(m.role), "content": _message_text(m)} for m in messages]
    for i, turn in enumerate(conversation):
        try:
            check_text(f"messages[{i}].content", turn["content"])
        except ParamError as exc:
            raise APIError(400, exc.message, INVALID_REQUEST, exc.param, "invalid_value") from None
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
        )
    except Exception as exc:  # templates raise on conversations they do not accept (e.g. role order)
        raise APIError(400, f"The chat template rejected the messages: {exc}", INVALID_REQUEST, "messages") from exc
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _template_role(role: str) -> str:
    return "system" if role == "developer" else role  # chat templates predate the developer role


def _message_text(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)


def chat_max_tokens(body: ChatCompletionRequest, prompt_len: int, max_model_len: int, default: int) -> int:
    """The explicit limit, else the server default cut to the context the prompt leaves (at least 1)."""
    explicit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if explicit is not None:
        return explicit
    return max(1, min(default, max_model_len - prompt_len))


def choice_requests(
    base_id: str,
    prompts: list[str | list[int] | Infill],
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    defaults: EngineDefaults,
) -> list[ChoiceRequest]:
    """n engine requests per prompt; choice index = prompt index * n + i, as OpenAI numbers them."""
    return [
        ChoiceRequest(
            request_id=f"{base_id}-{p * body.n + i}",
            prompt=prompt,
            params=sampling_params(body, max_tokens, i),
            cache=body.cache or defaults.cache,
            unmask=body.unmask or defaults.unmask,
        )
        for p, prompt in enumerate(prompts)
        for i in range(body.n)
    ]


# --- outputs --------------------------------------------------------------------------------------


def finish_reason(out: RequestOutput) -> str | None:
    """'stop' or 'length' for a finished request; raises `APIError` if it ended in failure."""
    if not out.finished:
        return None
    if out.finish_reason is FinishReason.ERROR:
        raise engine_failure(out.error)
    if out.finish_reason is FinishReason.ABORT:
        raise APIError(503, "The request was aborted by the server (shutting down).", SERVER_ERROR, None, "aborted")
    return "length" if out.finish_reason is FinishReason.LENGTH else "stop"


def block_state(view: BlockView | None) -> BlockState | None:
    if view is None:
        return None
    return BlockState(
        index=view.index,
        step=view.step,
        text=view.text(MASK_PLACEHOLDER),
        num_masked=view.num_masked,
        placeholder=MASK_PLACEHOLDER,
    )


def usage(finals: list[RequestOutput], n: int) -> UsageInfo:
    """Prompt tokens count once per prompt (not per choice); completion tokens sum over choices."""
    prompt = sum(len(out.prompt_token_ids) for k, out in enumerate(finals) if k % n == 0)
    completion = sum(len(out.token_ids) for out in finals)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

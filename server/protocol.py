"""OpenAI wire types (pydantic): requests, responses, stream chunks, models, errors.

Only the shapes live here; `server.translate` turns them into engine types and
back. Requests reject unknown fields (as OpenAI does: "Unrecognized request
argument"), so a misspelt diffusion field is a 400, not a silent default.

Diffusion extension fields (`DiffusionFields`) are accepted by both
generation endpoints; the OpenAI SDK sends them through `extra_body`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
)

import engine.params as engine_params
from engine.params import (
    CACHE_POLICIES,
    CONFIDENCE_KINDS,
    UNMASK_POLICIES,
    EngineDefaults,
)

MAX_CHOICES = 16
MAX_STOP_STRINGS = 16

CachePolicyName = Literal[tuple(CACHE_POLICIES)]  # type: ignore[valid-type]
UnmaskPolicyName = Literal[tuple(UNMASK_POLICIES)]  # type: ignore[valid-type]
ConfidenceName = Literal[tuple(CONFIDENCE_KINDS)]  # type: ignore[valid-type]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    """A response object; fields named in `_omit_if_none` are left out of the JSON when None.

    That keeps extension fields (`block`) and optional deltas (`role`) out of
    ordinary payloads while OpenAI's own nullable fields stay present as null.
    """

    _omit_if_none: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_extensions(self, handler):
        data = handler(self)
        for name in self._omit_if_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


def _wrap_union(value: Any, handler, message: str):
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(message) from None


# --- requests ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


def _method_fields() -> dict[str, Any]:
    """One optional request field per parameter of a single cache/unmask method (`dkv_refresh`, ...).

    Derived from `EngineDefaults`, so a method the engine adds is accepted here
    (and documented in /openapi.json) without a server change.
    """
    declared = {"block_length", "steps", "cache", "unmask", "threshold", "factor", "confidence"}
    owners = getattr(engine_params, "METHOD_FIELDS", {})
    result = {}
    for f in fields(EngineDefaults):
        if f.name in declared:
            continue
        default = getattr(EngineDefaults(), f.name)
        kind = (
            bool
            if isinstance(default, bool)
            else int
            if isinstance(default, int)
            else float
            if isinstance(default, float)
            else str
        )
        owner = owners.get(f.name)
        applies = f"For {owner[0]}={owner[1]!r}. " if owner else ""
        result[f.name] = (kind | None, Field(None, description=f"{applies}Server default: {default}."))
    return result


_MethodFields = create_model("_MethodFields", __base__=_Request, **_method_fields())
METHOD_FIELD_NAMES = tuple(_MethodFields.model_fields)


class DiffusionFields(_MethodFields):
    """Per-request denoising controls; unset fields take the server's CLI defaults."""

    block_length: int | None = Field(None, ge=1, description="Tokens per block; blocks are denoised left to right.")
    steps: int | None = Field(
        None, ge=1, description="Denoising steps per block for the fixed-step unmask policies (<= block_length)."
    )
    cache: CachePolicyName | None = Field(None, description="Cache policy: which positions are recomputed each step.")
    unmask: UnmaskPolicyName | None = Field(None, description="Unmask policy: how many tokens a step commits.")
    threshold: float | None = Field(None, description="Confidence threshold in (0, 1] for `unmask=threshold`.")
    factor: float | None = Field(None, description="Factor f > 0 for `unmask=factor`.")
    confidence: ConfidenceName | None = Field(None, description="How a masked position's confidence is measured.")
    stream_blocks: bool = Field(
        False,
        description="With `stream`, also send a chunk at every denoising step carrying the partially "
        "unmasked block in the choice's `block` field.",
    )


class _SamplingFields(DiffusionFields):
    temperature: float | None = Field(None, description="0 (the default) is greedy, as diffusion LMs are usually run.")
    top_p: float | None = Field(None, description="Nucleus sampling mass in (0, 1].")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt; choice i uses seed + i.")
    seed: int | None = Field(None, ge=0, description="Makes sampling reproducible.")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings; the text ends before the first one.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only an empty map is supported.")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop_shape(cls, value, handler):
        return _wrap_union(value, handler, "stop must be a string or a list of strings")


class CompletionRequest(_SamplingFields):
    model: str | None = Field(None, description="A served model name; the served model when omitted.")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    max_tokens: int | None = Field(None, ge=1, description="Canvas length in tokens (default 16, as OpenAI).")
    echo: bool = Field(False, description="Prepend the prompt to the completion text.")
    logprobs: int | None = Field(None, description="Not supported: must be null.")
    best_of: int | None = Field(None, description="Only null or equal to n is supported.")
    suffix: str | None = Field(None, description="Not supported: must be null.")

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value, handler):
        return _wrap_union(
            value,
            handler,
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
        )


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content_shape(cls, value, handler):
        return _wrap_union(value, handler, "content must be a string or a list of text parts")


class ChatCompletionRequest(_SamplingFields):
    model: str | None = Field(None, description="A served model name; the served model when omitted.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Canvas length in tokens; default: the server's default, cut to the context left."
    )
    logprobs: bool | None = Field(None, description="Not supported: must be false or null.")
    top_logprobs: int | None = Field(None, description="Not supported: must be null.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: must be empty or null.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none' is supported.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is supported.")


# --- responses --------------------------------------------------------------------------------

FinishReasonName = Literal["stop", "length"]


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BlockState(BaseModel):
    """Extension: the block being denoised, as of this step."""

    index: int = Field(description="Block index within the completion, from 0.")
    step: int = Field(description="Denoising steps taken in this block so far.")
    text: str = Field(description="The block's text; each still-masked token shows as the placeholder.")
    num_masked: int = Field(description="Tokens of the block still masked.")
    placeholder: str = Field(description="The character standing for one masked token in `text`.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReasonName | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionChunkChoice(_Response):
    _omit_if_none = ("block",)

    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReasonName | None = None
    block: BlockState | None = Field(None, description="Extension, with stream_blocks: the current block.")


class CompletionChunk(BaseModel):
    """One SSE event of a streamed completion; with include_usage the last has no choices and a usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReasonName | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatDelta(_Response):
    _omit_if_none = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    _omit_if_none = ("block",)

    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReasonName | None = None
    block: BlockState | None = Field(None, description="Extension, with stream_blocks: the current block.")


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion: role first, then content, finish_reason last."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "unmask"
    max_model_len: int = Field(description="Extension: prompt + max_tokens may not exceed this.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

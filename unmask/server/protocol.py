"""OpenAI wire types (pydantic): requests, responses, stream chunks, models, errors.

Only the shapes live here; `server.translate` turns them into engine types and
back. Requests reject unknown fields (as OpenAI does: "Unrecognized request
argument"), so a misspelt diffusion field is a 400, not a silent default.

Diffusion extension fields (`DiffusionFields`) are accepted by both
generation endpoints; the OpenAI SDK sends them through `extra_body`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from unmask.engine.method_params import METHOD_PARAMS
from unmask.engine.params import (
    BLOCK_START_RULES,
    CACHE_POLICIES,
    CONFIDENCE_KINDS,
    MAX_LOGPROBS,
    SCHEDULES,
    UNMASK_POLICIES,
)

# JSON types, not Python's coercions: `true` is not the integer 1, nor "5" the number 5.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an integer is a number, so 1 is accepted here
Bool = Annotated[bool, Strict()]

MAX_CHOICES = 16
MAX_STOP_STRINGS = 16

CachePolicyName = Literal[tuple(CACHE_POLICIES)]  # type: ignore[valid-type]
UnmaskPolicyName = Literal[tuple(UNMASK_POLICIES)]  # type: ignore[valid-type]
ConfidenceName = Literal[tuple(CONFIDENCE_KINDS)]  # type: ignore[valid-type]
ScheduleName = Literal[tuple(SCHEDULES)]  # type: ignore[valid-type]
BlockStartRule = Literal[tuple(BLOCK_START_RULES)]  # type: ignore[valid-type]

# The ranges `engine.params.SamplingParams.validate` enforces, stated in the schema too so that
# /openapi.json says what is accepted (tests/test_server_api.py checks the two agree). The
# methods' own parameters bring theirs from their declaration (`engine.method_params`).
BOUNDS: dict[str, dict[str, float]] = {
    "temperature": {"ge": 0, "le": 100},
    "top_p": {"gt": 0, "le": 1},
    "top_k": {"ge": -1},
    "min_p": {"ge": 0, "le": 1},
    "seed": {"ge": 0, "le": 2**63 - 1},
    "block_length": {"ge": 1},
    "steps": {"ge": 1},
    **{p.name: p.bounds() for p in METHOD_PARAMS},
}


class _Request(BaseModel):
    # Strict: a JSON value must have the documented type (`true` is not a token id, `0` is
    # not a boolean, `4.0` is not an integer), as /openapi.json says; numbers given as
    # integers are still accepted where a float is documented.
    model_config = ConfigDict(extra="forbid", strict=True)


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


UNSUPPORTED = "unsupported"  # pydantic error type of a feature this server does not implement
_WHY_NOT = {
    "best_of": "use n",
    "tools": "tool calling is not implemented",
    "tool_choice": "tool calling is not implemented",
    "response_format": "only plain text output is implemented",
    "functions": "tool calling is not implemented",
    "function_call": "tool calling is not implemented",
    "audio": "only text output is implemented",
    "modalities": "only text output is implemented",
    "reasoning_effort": "the model has no reasoning setting",
    "verbosity": "the model has no verbosity setting",
    "web_search_options": "web search is not implemented",
}


def _unsupported(value: Any, handler, field: str, why: str):
    """Validate; on failure report the field as an unsupported feature, not as a type error."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(UNSUPPORTED, f"{field} is not supported: {why}.") from None


NonEmptyStr = Annotated[str, Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Strict(), Field(ge=0)]


class TextResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]


# --- requests ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: Bool = Field(False, description="Send a last chunk with `usage` and no choices.")


def _method_fields() -> dict[str, Any]:
    """One optional request field per method parameter (`threshold`, `dkv_refresh`, ...), from its declaration.

    So a parameter the engine declares is accepted here, with its range and
    help in /openapi.json, without a server change.
    """
    return {
        p.name: (
            (Int if p.kind is int else Float) | None,
            Field(None, description=f"For {p.applies_to}: {p.help}. Server default: {'off' if p.default is None else p.default}.", **BOUNDS[p.name]),
        )
        for p in METHOD_PARAMS
    }


_MethodFields = create_model("_MethodFields", __base__=_Request, **_method_fields())
METHOD_FIELD_NAMES = tuple(_MethodFields.model_fields)


class DiffusionFields(_MethodFields):
    """Per-request denoising controls; unset fields take the server's CLI defaults."""

    block_length: Int | None = Field(
        None, description="Tokens per block; blocks are denoised left to right.", **BOUNDS["block_length"]
    )
    steps: Int | None = Field(
        None,
        description="Denoising steps per block for the fixed-step unmask policies (<= block_length and max_tokens).",
        **BOUNDS["steps"],
    )
    cache: CachePolicyName | None = Field(None, description="Cache policy: which positions are recomputed each step.")
    unmask: UnmaskPolicyName | None = Field(None, description="Unmask policy: how many tokens a step commits.")
    confidence: ConfidenceName | None = Field(None, description="How a masked position's confidence is measured.")
    schedule: ScheduleName | None = Field(
        None,
        description="Tokens per step of the fixed-step unmask policies: llada (even), dream (Dream's timesteps); "
        "auto: the checkpoint's family.",
    )
    block_start: BlockStartRule | None = Field(
        None,
        description="first: a block's first position is committed alone at the block's first step (Fast-dLLM's "
        "Dream rule); confidence: the unmask policy chooses; auto: first for Dream under cache prefix/dual with "
        "unmask=threshold.",
    )
    stream_blocks: Bool = Field(
        False,
        description="With `stream`, also send a chunk at every denoising step carrying the partially "
        "unmasked block in the choice's `block` field.",
    )


class _SamplingFields(DiffusionFields):
    temperature: Float | None = Field(
        None, description="0 (the default) is greedy, as diffusion LMs are usually run.", **BOUNDS["temperature"]
    )
    top_p: Float | None = Field(None, description="Nucleus sampling mass.", **BOUNDS["top_p"])
    top_k: Int | None = Field(
        None, description="Sample among the k likeliest tokens; 0 or -1 (the default) keeps all.", **BOUNDS["top_k"]
    )
    min_p: Float | None = Field(
        None, description="Drop tokens less likely than min_p times the likeliest (0, the default, keeps all).",
        **BOUNDS["min_p"],
    )
    n: Int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt; choice i uses seed + i.")
    seed: Int | None = Field(None, description="Makes sampling reproducible.", **BOUNDS["seed"])
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description="Up to 16 non-empty strings; the text ends before the first one."
    )
    ignore_eos: Bool = Field(
        False,
        description="Extension (as in vLLM): generate past end-of-text, so that the completion has exactly "
        "max_tokens tokens unless a stop string ends it (end-of-text tokens count, but are not in the text).",
    )
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted for compatibility; not used.")
    presence_penalty: Float | None = Field(None, ge=0, le=0, description="Not supported: only 0 (or null).")
    frequency_penalty: Float | None = Field(None, ge=0, le=0, description="Not supported: only 0 (or null).")
    logit_bias: dict[str, Float] | None = Field(None, max_length=0, description="Not supported: only {} (or null).")

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop_shape(cls, value, handler):
        return _wrap_union(value, handler, "stop must be a non-empty string or a list of at most 16 of them")

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", mode="wrap")
    @classmethod
    def _no_penalties(cls, value, handler, info):
        return _unsupported(value, handler, info.field_name, "diffusion decoding has no penalties or biases")


class CompletionRequest(_SamplingFields):
    model: str | None = Field(None, description="A served model name; the served model when omitted.")
    prompt: (
        NonEmptyStr
        | Annotated[list[NonEmptyStr], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(description="A string, a list of strings, a list of token ids, or a list of token-id lists (none empty).")
    max_tokens: Int | None = Field(
        None, ge=0, description="Canvas length in tokens (default 16, as OpenAI); 0 only with echo (score the prompt)."
    )
    echo: Bool = Field(False, description="Prepend the prompt to the completion text.")
    logprobs: Int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Return each generated token's log-probability at the step that committed it, with this many "
        "likeliest alternatives; with echo, also each prompt token's log p(x_i | x_<i, later positions masked).",
    )
    best_of: Int | None = Field(None, ge=1, le=1, description="Not supported (use n): only 1 (or null).")
    suffix: str | None = Field(
        None,
        description="Insert mode: text that follows the completion. The max_tokens canvas is written between "
        "prompt and suffix (the suffix is fixed and attended both ways); the completion is the canvas's text.",
    )

    @field_validator("best_of", mode="wrap")
    @classmethod
    def _not_supported(cls, value, handler, info):
        return _unsupported(value, handler, info.field_name, _WHY_NOT[info.field_name])

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value, handler):
        return _wrap_union(
            value,
            handler,
            "prompt must be a non-empty string, list of strings, list of token ids or list of token-id lists",
        )


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None
    # What an OpenAI SDK's assistant message carries when a client sends it back as history.
    refusal: None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    function_call: None = None
    audio: None = None
    annotations: list[dict[str, Any]] | None = Field(None, description="Accepted, not used.")

    @field_validator("content", mode="wrap")
    @classmethod
    def _content_shape(cls, value, handler):
        return _wrap_union(value, handler, "content must be a string or a list of text parts")


class ChatCompletionRequest(_SamplingFields):
    model: str | None = Field(None, description="A served model name; the served model when omitted.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: Int | None = Field(
        None, ge=1, description="Canvas length in tokens; default: the server's default, cut to the context left."
    )
    logprobs: Bool | None = Field(
        None, description="Return each generated token's log-probability at the step that committed it."
    )
    top_logprobs: Int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: this many likeliest alternatives per token."
    )
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported: must be [] or null.")
    tool_choice: Literal["none"] | None = Field(None, description="Only 'none' (or null) is supported.")
    response_format: TextResponseFormat | None = Field(None, description="Only {'type': 'text'} is supported.")
    # OpenAI fields accepted at the values that change nothing here (SDKs and proxies send them set).
    parallel_tool_calls: Bool | None = Field(None, description="Accepted; there are no tools to call.")
    store: Bool | None = Field(None, description="Accepted; nothing is stored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted, not used.")
    service_tier: str | None = Field(None, description="Accepted, not used.")
    prompt_cache_key: str | None = Field(None, description="Accepted, not used.")
    safety_identifier: str | None = Field(None, description="Accepted, not used.")
    prediction: dict[str, Any] | None = Field(None, description="Accepted, not used (it only saves time).")
    modalities: Annotated[list[Literal["text"]], Field(max_length=1)] | None = Field(
        None, description="Only ['text'] (or null)."
    )
    functions: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported: [] or null.")
    function_call: Literal["none"] | None = Field(None, description="Only 'none' (or null) is supported.")
    audio: None = Field(None, description="Not supported: must be null.")
    reasoning_effort: None = Field(None, description="Not supported: must be null.")
    verbosity: None = Field(None, description="Not supported: must be null.")
    web_search_options: None = Field(None, description="Not supported: must be null.")

    @field_validator(
        "tools",
        "tool_choice",
        "response_format",
        "functions",
        "function_call",
        "audio",
        "modalities",
        "reasoning_effort",
        "verbosity",
        "web_search_options",
        mode="wrap",
    )
    @classmethod
    def _not_supported(cls, value, handler, info):
        return _unsupported(value, handler, info.field_name, _WHY_NOT[info.field_name])


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


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: one entry per token (prompt tokens first with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for the first prompt token (it has no prefix).")
    top_logprobs: list[dict[str, float] | None] = Field(description="The likeliest alternatives and the token itself.")
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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

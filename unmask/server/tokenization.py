"""Wire types of the tokenizer endpoints (`/tokenize`, `/detokenize`, `/tokenizer_info`), shaped as vLLM's.

Clients such as lm-eval's `local-completions` probe these to tokenize remotely
(its likelihood requests send token ids and count the context's tokens).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from unmask.server.protocol import Bool, ChatMessage, TokenId, _Request


class TokenizeRequest(_Request):
    """vLLM's two tokenize requests in one: a `prompt` as text, or chat `messages` through the chat template."""

    model: str | None = Field(None, description="A served model name; the served model when omitted.")
    prompt: str | None = Field(None, description="Text to tokenize (give this or messages).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="A conversation to render and tokenize.")
    add_special_tokens: Bool | None = Field(
        None, description="Add the tokenizer's special tokens; default true for prompt, false for messages (as vLLM)."
    )
    add_generation_prompt: Bool = Field(True, description="messages: end with the assistant's turn opening.")
    continue_final_message: Bool = Field(False, description="messages: leave the last message open, to be continued.")
    return_token_strs: Bool = Field(False, description="Also return each token's string.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = Field(None, description="A served model name; the served model when omitted.")
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """The tokenizer's configuration, as in its `tokenizer_config.json` (vLLM's `/tokenizer_info`)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    mask_token: str | None = None
    chat_template: str | None = None
    model_max_length: int

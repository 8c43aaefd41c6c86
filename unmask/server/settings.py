"""Server-side settings (everything that is not the engine's `EngineConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from unmask.engine.params import EngineDefaults

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256


@dataclass
class ServerSettings:
    """How the HTTP layer behaves.

    `served_model_names`: the names clients may put in `model` (the first is
    reported); empty means the model directory's name. `defaults` are the
    engine's server-wide denoising defaults, used here for metric labels.
    """

    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    max_request_bytes: int = 4 * 2**20
    retry_after_seconds: int = 1
    completion_max_tokens: int = DEFAULT_COMPLETION_MAX_TOKENS
    chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    defaults: EngineDefaults = field(default_factory=EngineDefaults)

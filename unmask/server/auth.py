"""Bearer-token auth for `/v1/*` and the tokenizer endpoints (`--api-key` / `UNMASK_API_KEY`).

It runs as ASGI middleware, before the body is read, so an unauthenticated
client learns nothing about the request (not even that its JSON is bad).
`/health`, `/metrics` and the OpenAPI docs stay open for probes and scrapers.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from unmask.server.errors import AUTHENTICATION, APIError

PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


def is_protected(path: str) -> bool:
    """Whether a path needs the key: the API and the tokenizer (which costs work and shows the chat template)."""
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def is_authorized(token: str | None, api_key: str) -> bool:
    """Constant-time comparison, so response timing does not leak the key."""
    return token is not None and hmac.compare_digest(token.encode(), api_key.encode())


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]):
            if not is_authorized(bearer_token(scope["headers"]), self.api_key):
                error = APIError(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    AUTHENTICATION,
                    None,
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every failure the server can answer goes through `APIError` or one of the
handlers installed by `install_error_handlers`, so no client ever sees
FastAPI's default `{"detail": ...}` body.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from unmask.engine.errors import EngineDeadError, QueueFullError
from unmask.engine.params import ParamError
from unmask.server.protocol import UNSUPPORTED, ErrorDetail, ErrorResponse

log = logging.getLogger("unmask.server")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"

# Union members and validator wrappers that pydantic puts into an error's location;
# they are not field names, so they are dropped from the `param` shown to clients.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class _ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped.

    Error messages may quote the client's input (a model name, a field name), and
    JSON input can carry lone surrogates (`"\\ud800"`): valid JSON escapes, but not
    encodable as UTF-8, so the default renderer would turn a 4xx into a 500.
    """

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error response: raise it anywhere in a route and the client gets it, OpenAI-shaped."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return _ErrorJSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as one SSE event, for failures after a stream has started."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", NOT_FOUND, "model", "model_not_found")


def engine_failure(detail: str | None) -> APIError:
    return APIError(
        500, f"The engine failed on this request: {detail or 'unknown error'}", SERVER_ERROR, None, "engine_error"
    )


def from_engine_exception(exc: Exception, retry_after_seconds: int) -> APIError:
    """Map what the engine raises (adding a request, or ending it early) to the response a client should get."""
    if isinstance(exc, ParamError):
        return APIError(400, exc.message, INVALID_REQUEST, exc.param, "invalid_value")
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"The server is busy ({exc}); retry after {retry_after_seconds} s.",
            RATE_LIMIT,
            None,
            "queue_full",
            {"Retry-After": str(retry_after_seconds)},
        )
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is unavailable: {exc}", UNAVAILABLE, None, "engine_unavailable")
    log.exception("unexpected error while adding a request", exc_info=exc)
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", SERVER_ERROR, None, "internal_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (e.g. `messages[0].role`)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "Invalid request.", INVALID_REQUEST)
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if not _is_type_tag(part)]
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(
            400, f"The request body is not valid JSON: {reason}".rstrip(": "), INVALID_REQUEST, None, "invalid_json"
        )
    if kind == "missing" and not loc:
        return APIError(400, "The request needs a JSON body.", INVALID_REQUEST, None, "missing_body")
    param = param_path(loc)
    if kind == "extra_forbidden":
        return APIError(
            400, f"Unrecognized request argument supplied: {param}", INVALID_REQUEST, param, "unknown_parameter"
        )
    if kind == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", INVALID_REQUEST, param, "missing_required_parameter"
        )
    if kind == UNSUPPORTED:
        return APIError(400, str(first.get("msg")), INVALID_REQUEST, param, "unsupported_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {message}", INVALID_REQUEST, param or None, "invalid_value")


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-"))


def param_path(loc: list) -> str:
    """A location as clients write it: `messages[0].content`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _http_error(exc: StarletteHTTPException) -> APIError:
    if exc.status_code == 404:
        return APIError(404, "Not found: no such route.", NOT_FOUND, None, "not_found")
    kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
    # Starlette fills `detail` with the status phrase ("Method Not Allowed") when none is given.
    return APIError(exc.status_code, str(exc.detail), kind, None, None, dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app can produce OpenAI-shaped."""

    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _http_error(exc).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return APIError(500, "Internal server error.", SERVER_ERROR, None, "internal_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)

"""The generation routes' body, checked before FastAPI reads it: a JSON object, UTF-8, finite numbers.

FastAPI would take a form-encoded body (`curl -d` without a JSON content type)
as raw bytes ("Input should be a valid dictionary"), answer undecodable bytes
with a bare "error parsing the body", and let Python's `json` turn `NaN`,
`Infinity` and `1e999` into floats that fail some unrelated range check. Here
each of these is a 400 that says what is wrong and, for a number, which field.
"""

from __future__ import annotations

import json
import math
from email.message import Message
from typing import Any, Callable

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from unmask.server.errors import INVALID_REQUEST, APIError, param_path


_JSON_TYPE_NAMES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class _NonFinite:
    """Stands in, while parsing, for a number JSON cannot hold (NaN, ±Infinity, an overflow)."""

    def __init__(self, text: str):
        self.text = text


def _is_json_type(content_type: str) -> bool:
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _first_non_finite(value: Any, path: list) -> tuple[list, _NonFinite] | None:
    if isinstance(value, _NonFinite):
        return path, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _first_non_finite(child, [*path, key])
        if found is not None:
            return found
    return None


def parse_json_object(body: bytes, content_type: str | None) -> dict | None:
    """The body as a JSON object (None when empty, for FastAPI to report as missing); `APIError` otherwise."""
    if not body:
        return None
    if content_type is not None and not _is_json_type(content_type):
        raise APIError(
            400,
            f"The request body must be a JSON object sent with 'Content-Type: application/json'; it came as "
            f"{content_type!r} (curl -d sends form data unless you add -H 'Content-Type: application/json').",
            INVALID_REQUEST,
            None,
            "invalid_content_type",
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            400, f"The request body is not valid UTF-8 (byte {exc.start}); JSON must be UTF-8.", INVALID_REQUEST, None,
            "invalid_encoding",
        ) from None
    non_finite: list[_NonFinite] = []

    def constant(name: str) -> _NonFinite:
        non_finite.append(_NonFinite(name))
        return non_finite[-1]

    def number(text: str) -> float | _NonFinite:
        value = float(text)
        return value if math.isfinite(value) else constant(text)  # 1e999 overflows to infinity

    try:
        parsed = json.loads(text, parse_constant=constant, parse_float=number)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an integer of over 4300 digits
        raise APIError(400, f"The request body is not valid JSON: {exc}", INVALID_REQUEST, None, "invalid_json") from None
    if not isinstance(parsed, dict):
        raise APIError(
            400, f"The request body must be a JSON object, not a JSON {_JSON_TYPE_NAMES[type(parsed)]}.", INVALID_REQUEST, None,
            "invalid_json",
        )
    if non_finite:
        path, value = _first_non_finite(parsed, [])  # type: ignore[misc]
        param = param_path(path)
        raise APIError(
            400,
            f"Invalid value for '{param}': {value.text} is not a finite number (JSON has no NaN or infinities).",
            INVALID_REQUEST,
            param,
            "invalid_value",
        )
    return parsed


class JSONBodyRoute(APIRoute):
    """An `APIRoute` whose JSON body is checked by `parse_json_object` before FastAPI validates it."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            parsed = parse_json_object(await request.body(), request.headers.get("content-type"))
            if parsed is not None:
                request._json = parsed  # Starlette's cache of `request.json()`: FastAPI then parses nothing again
            return await handler(request)

        return checked

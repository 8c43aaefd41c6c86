"""OpenAPI `responses` entries shared by the routes, so /openapi.json lists every status a route returns."""

from __future__ import annotations

from unmask.server.protocol import ErrorResponse

_ERRORS = {
    400: "Invalid request: malformed JSON, a bad field (named in `param`), an unsupported feature, "
    "or prompt + max_tokens beyond the context.",
    401: "Missing or wrong API key (only when the server has one).",
    404: "Unknown model.",
    413: "Request body too large.",
    429: "Waiting queue full; retry after `Retry-After` seconds.",
    500: "The engine failed on this request (other requests are unaffected).",
    503: "The engine is shutting down or not running.",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in statuses}


def streaming_200(chunk_name: str, description: str) -> dict[int, dict]:
    """A 200 that is JSON normally and an SSE stream of `chunk_name` events with `stream: true`.

    The event-stream schema describes one event, as OpenAPI tools read it before 3.2's
    `itemSchema`: its `data` is a chunk as JSON; the last is `[DONE]`; a failure after
    the stream began arrives as an `ErrorResponse`.
    """
    payloads = [{"$ref": f"#/components/schemas/{chunk_name}"}, {"$ref": "#/components/schemas/ErrorResponse"}]
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json", "contentSchema": {"anyOf": payloads}},
    }
    return {
        200: {
            "description": description,
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {"data": data},
                        "description": f"With stream=true, each event: `data: <{chunk_name} JSON>`, "
                        "events separated by blank lines, the last one `data: [DONE]`.",
                    },
                    "x-unmask-event-schema": {"$ref": f"#/components/schemas/{chunk_name}"},
                }
            },
        }
    }


GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429, 500, 503)

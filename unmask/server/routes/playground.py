"""GET / : the live denoising playground, a static page shipped in the package (no build step, no CDN).

The page talks to the public API only (`/openapi.json` for the policy names the
server accepts, `/v1/*` for generation); `/playground/config.json` adds what
the API does not say: the server-wide denoising defaults (so the page can show
which policy a request will really use), which method each method-specific
field belongs to, and whether an API key is required.
None of these routes is part of the OpenAI surface, so they stay out of the schema.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

import unmask.engine.params as engine_params
from unmask.server.state import get_state

router = APIRouter()

ASSETS = {  # file -> media type; nothing else under server/playground/ is served
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# Everything the page loads comes from this server; the policy makes that a browser-enforced fact.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def asset_bytes(name: str) -> bytes:
    return resources.files("unmask.server").joinpath("playground", name).read_bytes()


def _asset(name: str) -> Response:
    return Response(asset_bytes(name), media_type=ASSETS[name], headers=HEADERS)


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return _asset("index.html")


@router.get("/playground/config.json", include_in_schema=False)
async def config(request: Request) -> JSONResponse:
    state = get_state(request)
    d = state.settings.defaults
    # A method's own parameter (dkv_refresh, ...) is refused on a request using another method,
    # so the page shows and sends each one only while its method is selected.
    method_fields = getattr(engine_params, "METHOD_FIELDS", {})
    return JSONResponse(
        {
            "model": state.model_name,
            "api_key_required": bool(state.settings.api_key),
            "defaults": {
                "cache": d.cache,
                "unmask": d.unmask,
                "block_length": d.block_length,
                "steps": d.steps,
                "threshold": d.threshold,
                "factor": d.factor,
            },
            "method_fields": [
                {"name": name, "kind": kind, "method": method, "default": getattr(d, name, None)}
                for name, (kind, method) in method_fields.items()
            ],
        },
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise HTTPException(status_code=404)
    return _asset(name)

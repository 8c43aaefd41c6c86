"""GET / : the live denoising playground, a static page shipped in the package (no build step, no CDN).

The page talks to the public API only (`/openapi.json` for the policy names the
server accepts, `/v1/*` for generation); `/playground/config.json` adds what
the API does not say: the server-wide denoising defaults (so the page can show
which policy a request will really use), which method each method-specific
field belongs to, and whether an API key is required.
None of these routes is part of the OpenAI surface, so they stay out of the schema.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from unmask.engine.method_params import METHOD_FIELDS
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


@dataclass(frozen=True)
class Example:
    """A chat prompt the page offers with one click."""

    family: str
    label: str
    prompt: str


# Two of each task family the bundled model was trained on (training/tasks/), in its formats, so a
# newcomer's first clicks get right answers; the page's default prompt is the first lists example.
EXAMPLES = (
    Example("arithmetic", "12 + 30", "What is 12 + 30?"),
    Example(
        "arithmetic",
        "Lucy's eggs",
        "Lucy has 54 eggs. Lucy buys 8 bags with 4 eggs in each bag. How many eggs does Lucy have now?",
    ),
    Example(
        "recall",
        "code of ocelot",
        "Remember these codes.\nThe code of granite is 4766.\nThe code of ocelot is 6961.\n"
        "The code of tunnel is 4855.\nThe code of hamster is 9312.\nWhat is the code of ocelot?",
    ),
    Example(
        "recall",
        "code of anchor",
        "Remember these codes.\nThe code of falcon is 9558.\nThe code of anchor is 4979.\n"
        "The code of silver is 9977.\nWhat is the code of anchor?",
    ),
    Example("lists", "sort 42, 7, 19", "Sort these numbers from smallest to largest: 42, 7, 19"),
    Example("lists", "reverse a list", "Reverse this list: 16, 48, 67, 36, 68"),
    Example(
        "count",
        "count owl",
        "Here is a list: jelly, knot, piano, piano, owl, piano, owl, piano\nHow many times does owl appear in the list?",
    ),
    Example(
        "count",
        "count yarn",
        "Here is a list: fish, yarn, fish, kite, yarn, fish, yarn, yarn\nHow many times does yarn appear in the list?",
    ),
)


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
            "examples": [asdict(example) for example in EXAMPLES],
            "method_fields": [
                {"name": name, "kind": kind, "methods": list(methods), "default": getattr(d, name)}
                for name, (kind, methods) in METHOD_FIELDS.items()
            ],
        },
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS or name == "index.html":
        raise HTTPException(status_code=404)
    return _asset(name)

"""GET /v1/models, /health and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from unmask.server.metrics import CONTENT_TYPE
from unmask.server.protocol import HealthStatus, ModelCard, ModelList
from unmask.server.routes.docs import error_responses
from unmask.server.state import get_state

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401), summary="List the served model")
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    max_len = state.engine.max_model_len
    return ModelList(
        data=[ModelCard(id=name, created=state.started, max_model_len=max_len) for name in state.model_names]
    )


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses=error_responses(401, 404),
    summary="Describe a served model",
)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_model(model_id)
    return ModelCard(id=model_id, created=state.started, max_model_len=state.engine.max_model_len)


@router.get(
    "/health",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "The engine loop is not running."}},
    summary="Liveness: 200 only while the engine loop is alive",
)
async def health(request: Request) -> JSONResponse:
    alive = get_state(request).engine.is_alive
    body = HealthStatus(status="ok" if alive else "unavailable")
    return JSONResponse(body.model_dump(), status_code=200 if alive else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
            "description": "Prometheus text format.",
        }
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)

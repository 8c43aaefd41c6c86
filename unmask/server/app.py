"""The FastAPI application: routes, error handlers, middleware, metrics and the engine's lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from unmask.engine.client import EngineClient
from unmask.server.auth import AuthMiddleware, is_protected
from unmask.server.body_limit import BodyLimitMiddleware
from unmask.server.errors import install_error_handlers
from unmask.server.http_metrics import HTTPMetricsMiddleware
from unmask.server.metrics import Metrics
from unmask.server.protocol import ChatCompletionChunk, CompletionChunk
from unmask.server.routes import chat, completions, playground, swagger, system, tokenizer
from unmask.server.settings import ServerSettings
from unmask.server.state import ServerState

log = logging.getLogger("unmask.server")

VERSION = "0.1.0"
_PROGRESS_SECONDS = 5.0


def create_app(engine: EngineClient, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `engine` (an `AsyncEngine`, through its `EngineClient` interface).

    The app owns the engine's lifecycle: its lifespan starts the engine
    (loading the model) and, at shutdown, drains in-flight requests and stops it.
    """
    settings = settings or ServerSettings()
    app = FastAPI(
        title="Unmask",
        version=VERSION,
        description="OpenAI-compatible inference server for diffusion language models (LLaDA, Dream).",
        lifespan=_lifespan(engine),
        docs_url=None,  # served by routes/swagger.py from local files instead of a CDN
        redoc_url=None,
    )
    state = ServerState(
        engine, settings, Metrics(settings.served_model_names[0] if settings.served_model_names else engine.model_name)
    )
    state.metrics.bind_engine(engine)
    app.state.unmask = state
    routers = [completions.router, chat.router, tokenizer.router, system.router, playground.router, swagger.router]
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)

    # Added innermost first: the metrics middleware sees every response, 401s and 413s included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    routes = [route for router in routers for route in router.routes]
    app.add_middleware(HTTPMetricsMiddleware, metrics=state.metrics, routes=routes)
    app.openapi = lambda: _openapi(app, bool(settings.api_key))  # type: ignore[method-assign]
    return app


def _lifespan(engine: EngineClient):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await _start_with_progress(engine)
        try:
            yield
        finally:
            log.info("shutting down: finishing in-flight requests")
            await engine.shutdown()
            log.info("engine stopped")

    return lifespan


async def _start_with_progress(engine: EngineClient) -> None:
    """Start the engine, logging progress while the model loads."""
    log.info("loading model %s ...", engine.model_name)
    if engine.config.load_format == "dummy":
        log.warning("--load-format dummy: the weights of %s are random, so its text is meaningless", engine.model_name)
    start = time.perf_counter()
    task = asyncio.ensure_future(engine.start())
    while True:
        done, _ = await asyncio.wait({task}, timeout=_PROGRESS_SECONDS)
        if done:
            break
        log.info("still loading %s (%.0f s)", engine.model_name, time.perf_counter() - start)
    task.result()
    log.info(
        "model %s loaded in %.1f s: context %d tokens, %d KV pages",
        engine.model_name,
        time.perf_counter() - start,
        engine.max_model_len,
        engine.kv_pages_total,
    )


def _openapi(app: FastAPI, secured: bool) -> dict:
    """FastAPI's schema plus the SSE chunk models and, with an API key, the bearer scheme on /v1/*."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _drop_fastapi_422(schema)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in (CompletionChunk, ChatCompletionChunk):
        chunk = model.model_json_schema(mode="serialization", ref_template="#/components/schemas/{model}")
        schemas.update(chunk.pop("$defs", {}))
        schemas[model.__name__] = chunk
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if is_protected(path):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema


def _drop_fastapi_422(schema: dict) -> None:
    """FastAPI documents a 422 on every route; this server answers validation errors with 400 instead."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)

"""ASGI middleware that counts every HTTP request by route and status, and times it to the last byte."""

from __future__ import annotations

import time

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unmask.server.metrics import Metrics

CLIENT_CLOSED = 499  # the client went away before the answer (nginx's convention)


class HTTPMetricsMiddleware:
    """Records into `metrics`, labelled by route template; unknown paths share the `other` label
    so cardinality stays bounded."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def endpoint(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return getattr(route, "path", "other")
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = CLIENT_CLOSED

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException:
            if status == CLIENT_CLOSED:
                status = 500
            raise
        finally:
            self.metrics.observe_http(self.endpoint(scope), status, time.perf_counter() - start)

"""What every route needs: the engine, the settings, the metrics, the served model names."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from starlette.requests import Request

from unmask.engine.client import EngineClient
from unmask.server.errors import model_not_found
from unmask.server.metrics import Metrics
from unmask.server.settings import ServerSettings


@dataclass
class ServerState:
    engine: EngineClient
    settings: ServerSettings
    metrics: Metrics
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_names(self) -> list[str]:
        return self.settings.served_model_names or [self.engine.model_name]

    @property
    def model_name(self) -> str:
        """The name responses report."""
        return self.model_names[0]

    def check_model(self, requested: str | None) -> str:
        """The served name to report; 404 for a name this server does not serve (None means the default)."""
        if requested is not None and requested not in self.model_names:
            raise model_not_found(requested)
        return self.model_name


def get_state(request: Request) -> ServerState:
    return request.app.state.unmask


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"

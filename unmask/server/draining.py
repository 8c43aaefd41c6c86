"""uvicorn's server, with the engine's drain deadline set when the shutdown begins.

On SIGTERM uvicorn closes its listening socket and waits for the open
connections; without a deadline in the engine, what is still running when its
graceful timeout ends would be cancelled (a bare 500, a stream cut short).
With one, the engine ends those requests itself at the deadline, so each gets
an OpenAI-shaped 503 (or, streaming, an error event and `[DONE]`) first.
"""

from __future__ import annotations

import socket

import uvicorn

from unmask.engine.client import EngineClient


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, shutdown_timeout: float | None):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.begin_drain(self.shutdown_timeout)
        await super().shutdown(sockets)

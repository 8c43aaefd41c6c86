"""A real Unmask server on loopback for the server tests: real engine, real checkpoint, real uvicorn.

`live_server` (one per test session) serves the bundled model when the checkout has
it, else a small random LLaDA-layout checkpoint, from a uvicorn thread on a
free 127.0.0.1 port. Tests talk to it over HTTP only, through the official
`openai` client or httpx; the engine object is exposed for checks that HTTP
cannot make (its KV pool) and for fault injection.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from unmask.engine.async_engine import AsyncEngine
from unmask.engine.config import EngineConfig
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.server.app import create_app
from unmask.server.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "unmask-tiny"
API_KEY = "test-key-123"
MAX_NUM_SEQS = 4
MAX_WAITING = 4
MAX_REQUEST_BYTES = 256 * 1024


@dataclass
class LiveServer:
    base_url: str
    api_key: str
    model: str
    engine: AsyncEngine
    server: uvicorn.Server

    def openai(self, **kwargs) -> openai.OpenAI:
        key = self.api_key or "unused"  # the SDK insists on a key even when the server needs none
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, **kwargs)

    def http(self, auth: bool = True, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if auth and self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of /metrics, keyed by (sample name, sorted label items)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def model_dir_for_tests(tmp_path_factory) -> Path:
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    return make_random_checkpoint(tmp_path_factory.mktemp("server-llada"), arch="llada", layers=2, hidden=64, heads=4)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def serve_in_thread(model_dir: Path, settings: ServerSettings, **engine_options) -> Iterator[LiveServer]:
    """Start the app under uvicorn in a background thread; stop it (gracefully) when the generator resumes."""
    engine = AsyncEngine(EngineConfig(model_dir=str(model_dir), **engine_options))
    app = create_app(engine, settings)
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = sock.getsockname()[1]
    try:
        yield LiveServer(
            f"http://127.0.0.1:{port}", settings.api_key or "", app.state.unmask.model_name, engine, server
        )
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    settings = ServerSettings(api_key=API_KEY, max_request_bytes=MAX_REQUEST_BYTES)
    yield from serve_in_thread(
        model_dir_for_tests(tmp_path_factory),
        settings,
        max_num_seqs=MAX_NUM_SEQS,
        max_waiting=MAX_WAITING,
        kv_cache_memory=64 * 2**20,
        feature_cache=True,  # so that every cache policy is servable
    )


# --- helpers for raw SSE and metrics -----------------------------------------------------------


def sse_data(raw: str) -> list[str]:
    """The `data:` payloads of a raw SSE body, checking OpenAI's exact framing on the way."""
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = raw[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: "), f"not a data event: {event!r}"
        assert "\n" not in event, f"an event spans lines: {event!r}"
        payloads.append(event[len("data: ") :])
    return payloads


def sse_json(raw: str) -> list[dict]:
    payloads = sse_data(raw)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def sample(samples: dict, name: str, **labels) -> float:
    """One sample's value (0 when it has not been recorded yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

"""Reliability under load, faults and bad input: nothing is lost, nothing leaks, nothing crashes.

Every test runs a real server on 127.0.0.1 (real engine, real uvicorn; the bundled
model, or a small random checkpoint where the checkout lacks it) and talks to it over
HTTP. Only two things reach inside: the checks that no request is left in the engine
(state HTTP cannot show completely) and the runner's fault hook, which makes one
request's forward pass raise. Counts and lengths are small so the file stays within
about three minutes on two busy CPU cores; the scenarios are those of the reliability
issue:

- 64 clients at once with mixed policies, endpoints and streaming, some of whom leave
  mid-stream or time out on purpose;
- overload (429 with Retry-After) and recovery;
- hostile input (a 4xx each, never a 5xx, and the server keeps serving);
- a request whose forward pass raises (a 500 for it alone);
- draining (503) and SIGTERM under load (in-flight requests finish, new connections
  are refused, the process exits 0);
- security: the API key on every /v1/* route, the body size limit, no file served.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Mount

from unmask.server import auth
from unmask.server.settings import ServerSettings
from server_fixtures import LiveServer, model_dir_for_tests, sample, serve_in_thread, wait_until

REPO = Path(__file__).resolve().parent.parent
API_KEY = "reliability-key-0123456789"
MAX_REQUEST_BYTES = 64 * 1024
REQUEST_DEADLINE = 90.0  # seconds; a request still unanswered then has hung

PROMPTS = ["The quick brown fox", "What is 12 plus 30?", "Hello world! How are", "Sort: apple, banana,"]
# Policy mixes of the load: (cache, unmask, extra fields). All greedy (temperature 0),
# or seeded, so a request's text is the same alone or batched with any others.
POLICIES = [
    {"cache": "none", "unmask": "low_confidence"},
    {"cache": "prefix", "unmask": "threshold", "threshold": 0.7},
    {"cache": "dual", "unmask": "factor", "factor": 1.0},
    {"cache": "dkv", "unmask": "low_confidence", "steps": 2},
    {"cache": "freecache", "unmask": "threshold", "threshold": 0.9},
    {"cache": "dual", "unmask": "random", "seed": 5},
]
# A request that cannot finish soon: one 256-token block unmasked in random order, one
# token per step, so its committed prefix (and so end-of-text) stays short for many steps.
LONG = {"max_tokens": 256, "block_length": 256, "steps": 256, "unmask": "random", "seed": 1}


# --- talking to a server ------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One request: endpoint, prompt, policy fields, streaming."""

    chat: bool
    prompt: str
    stream: bool
    fields: tuple[tuple[str, object], ...]

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    def body(self, model: str) -> dict:
        body = {"model": model, "stream": self.stream, **dict(self.fields)}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


def spec(prompt: str, *, chat: bool = False, stream: bool = False, **fields) -> Spec:
    return Spec(chat, prompt, stream, tuple(sorted(fields.items())))


@dataclass
class Result:
    """What a client got: the status, the text (streams: the concatenated deltas) and how it ended."""

    status: int
    text: str = ""
    finish_reason: str | None = None
    error: dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = False  # a stream ended with `data: [DONE]`


@dataclass(frozen=True)
class Address:
    """Where a server is, for clients: an in-thread `LiveServer` or an `unmask serve` process."""

    base_url: str
    api_key: str
    model: str


def auth_headers(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def async_client(server: LiveServer | Address, **kwargs) -> httpx.AsyncClient:
    headers = auth_headers(server.api_key)
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=REQUEST_DEADLINE, **kwargs)


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (sample name, sorted label items)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def send(client: httpx.AsyncClient, request: Spec, model: str) -> Result:
    """Send one request and read all of its answer (streamed or not)."""
    if request.stream:
        return await _send_stream(client, request, model)
    response = await client.post(request.path, json=request.body(model))
    data = response.json()
    if response.status_code != 200:
        return Result(response.status_code, error=data.get("error"), headers=dict(response.headers))
    choice = data["choices"][0]
    text = choice["message"]["content"] if request.chat else choice["text"]
    return Result(200, text, choice["finish_reason"], headers=dict(response.headers))


async def _send_stream(client: httpx.AsyncClient, request: Spec, model: str) -> Result:
    async with client.stream("POST", request.path, json=request.body(model)) as response:
        if response.status_code != 200:
            await response.aread()
            return Result(response.status_code, error=response.json().get("error"), headers=dict(response.headers))
        result = Result(200, headers=dict(response.headers))
        async for line in response.aiter_lines():
            if line:
                _read_event(result, line, request.chat)
        return result


def _read_event(result: Result, line: str, chat: bool) -> None:
    assert line.startswith("data: "), f"not an SSE data line: {line!r}"
    payload = line[len("data: ") :]
    if payload == "[DONE]":
        result.done = True
        return
    event = json.loads(payload)
    if "error" in event:
        result.error = event["error"]
        return
    for choice in event["choices"]:
        result.text += (choice["delta"].get("content") or "") if chat else choice["text"]
        result.finish_reason = choice.get("finish_reason") or result.finish_reason


def run(coroutine):
    """Run a client coroutine on a fresh event loop (the server has its own, in its thread)."""
    return asyncio.run(coroutine)


async def solo_texts(server: LiveServer | Address, requests: list[Spec]) -> dict[Spec, str]:
    """Each distinct request run alone, one after another: the reference texts."""
    texts = {}
    async with async_client(server) as client:
        for request in dict.fromkeys(requests):
            result = await send(client, request, server.model)
            assert result.status == 200, result.error
            texts[request] = result.text
    return texts


def engine_is_idle(server: LiveServer) -> bool:
    """No request anywhere in the engine, every KV page free, and /metrics says so too."""
    engine = server.engine
    samples = server.metrics()
    return (
        not engine.engine.has_unfinished
        and engine.num_running == 0
        and engine.num_waiting == 0
        and not engine._channels  # the output streams of the async engine
        and engine.kv_pages_free == engine.kv_pages_total
        and sample(samples, "unmask_kv_pages_used", model=server.model) == 0
        and sample(samples, "unmask_requests_running", model=server.model) == 0
        and sample(samples, "unmask_requests_waiting", model=server.model) == 0
    )


def assert_still_serving(server: LiveServer) -> None:
    with server.http() as http:
        assert http.get("/health").status_code == 200
        response = http.post("/v1/completions", json={"model": server.model, "prompt": "Hello", "max_tokens": 4})
        assert response.status_code == 200, response.text


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# --- servers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return model_dir_for_tests(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[LiveServer]:
    """Roomy enough that the 64-client load is never refused: every refusal below is on purpose."""
    settings = ServerSettings(api_key=API_KEY, max_request_bytes=MAX_REQUEST_BYTES)
    yield from serve_in_thread(model_dir, settings, max_num_seqs=16, max_waiting=512, kv_cache_memory=128 * 2**20)


# --- 64 clients at once ---------------------------------------------------------------------------

NUM_CLIENTS = 64
REQUESTS_PER_CLIENT = 2
LEAVE_EVERY = 8  # every 8th request is a stream whose client leaves after the first event
TIME_OUT_EVERY = 16  # of the others, every 16th times out on purpose
TIMEOUT_SECONDS = 0.3


def load_plan() -> list[list[tuple[str, Spec]]]:
    """Per client, its requests in order: ("normal" | "leave" | "time out", request)."""
    normal = [
        spec(prompt, chat=chat, stream=stream, max_tokens=8, block_length=4, **POLICIES[i % len(POLICIES)])
        for i, (prompt, chat, stream) in enumerate(
            (p, c, s) for p in PROMPTS for c in (False, True) for s in (False, True)
        )
    ]
    leave = spec(PROMPTS[0], stream=True, stream_blocks=True, **LONG)
    time_out = spec(PROMPTS[1], **LONG)
    plan = []
    for c in range(NUM_CLIENTS):
        requests = []
        for r in range(REQUESTS_PER_CLIENT):
            k = c * REQUESTS_PER_CLIENT + r
            if k % LEAVE_EVERY == LEAVE_EVERY - 1:
                requests.append(("leave", leave))
            elif k % TIME_OUT_EVERY == 3:
                requests.append(("time out", time_out))
            else:
                requests.append(("normal", normal[k % len(normal)]))
        plan.append(requests)
    return plan


@dataclass
class Outcome:
    kind: str
    request: Spec
    result: Result | None = None
    left: bool = False  # the client left after the first event, as planned
    timed_out: bool = False  # the client's timeout fired, as planned
    hung: bool = False  # no answer within REQUEST_DEADLINE
    failure: str | None = None  # anything else that went wrong on the client's side


async def _leave_after_first_event(client: httpx.AsyncClient, request: Spec, model: str) -> bool:
    async with client.stream("POST", request.path, json=request.body(model)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return True  # leaving the block closes the connection mid-stream
    return False


async def _one(client: httpx.AsyncClient, kind: str, request: Spec, model: str) -> Outcome:
    outcome = Outcome(kind, request)
    try:
        if kind == "leave":
            outcome.left = await asyncio.wait_for(_leave_after_first_event(client, request, model), REQUEST_DEADLINE)
        elif kind == "time out":
            await client.post(request.path, json=request.body(model), timeout=httpx.Timeout(30, read=TIMEOUT_SECONDS))
        else:
            outcome.result = await asyncio.wait_for(send(client, request, model), REQUEST_DEADLINE)
    except httpx.ReadTimeout:
        outcome.timed_out = True
    except asyncio.TimeoutError:
        outcome.hung = True
    except Exception as exc:  # recorded, and asserted on below
        outcome.failure = f"{type(exc).__name__}: {exc}"
    return outcome


async def _client(server: LiveServer, requests: list[tuple[str, Spec]], start: asyncio.Event) -> list[Outcome]:
    async with async_client(server) as client:
        await start.wait()
        return [await _one(client, kind, request, server.model) for kind, request in requests]


async def _load(server: LiveServer, plan: list[list[tuple[str, Spec]]]) -> list[Outcome]:
    start = asyncio.Event()
    clients = [asyncio.ensure_future(_client(server, requests, start)) for requests in plan]
    await asyncio.sleep(0.2)  # every client is set up; then they all go at once
    start.set()
    return [outcome for outcomes in await asyncio.gather(*clients) for outcome in outcomes]


@dataclass
class LoadRun:
    outcomes: list[Outcome]
    solo: dict[Spec, str]
    aborts: float  # engine requests ended by abort during the load
    crowded_steps: float  # engine steps that ran more than 8 sequences together
    idle_after: bool  # the engine drained and every page came back


@pytest.fixture(scope="module")
def load_run(server) -> LoadRun:
    plan = load_plan()
    normal = [request for requests in plan for kind, request in requests if kind == "normal"]
    solo = run(solo_texts(server, normal))
    assert wait_until(lambda: engine_is_idle(server))
    before = server.metrics()
    outcomes = run(_load(server, plan))
    idle = wait_until(lambda: engine_is_idle(server), timeout=30)
    after = server.metrics()

    def grew(name: str, **labels) -> float:
        return sample(after, name, model=server.model, **labels) - sample(before, name, model=server.model, **labels)

    aborts = grew("unmask_requests_finished_total", finish_reason="abort")
    crowded = grew("unmask_step_batch_size_count") - grew("unmask_step_batch_size_bucket", le="8.0")
    return LoadRun(outcomes, solo, aborts, crowded, idle)


def test_load_runs_every_planned_request(load_run):
    assert len(load_run.outcomes) == NUM_CLIENTS * REQUESTS_PER_CLIENT
    kinds = [o.kind for o in load_run.outcomes]
    assert kinds.count("leave") >= 16 and kinds.count("time out") >= 4
    assert not [o.failure for o in load_run.outcomes if o.failure]
    assert load_run.crowded_steps > 0, "the load never batched more than 8 requests together"


def test_no_request_hangs_under_load(load_run):
    assert not [o for o in load_run.outcomes if o.hung]


def test_every_request_that_was_not_cancelled_completes_with_its_solo_text(load_run):
    for outcome in (o for o in load_run.outcomes if o.kind == "normal"):
        result = outcome.result
        assert result is not None and result.status == 200, (outcome.request, result)
        assert result.finish_reason in ("stop", "length")
        assert result.done or not outcome.request.stream, "a stream ended without [DONE]"
        assert result.text == load_run.solo[outcome.request], outcome.request


def test_clients_that_leave_or_time_out_are_aborted(load_run):
    left = sum(o.left for o in load_run.outcomes)
    timed_out = sum(o.timed_out for o in load_run.outcomes)
    assert left == sum(o.kind == "leave" for o in load_run.outcomes)
    assert timed_out == sum(o.kind == "time out" for o in load_run.outcomes)
    assert load_run.aborts == left + timed_out  # each one aborted, none run to the end


def test_after_the_load_the_kv_pool_is_full_and_no_request_is_left_in_the_engine(load_run):
    assert load_run.idle_after


# --- overload ------------------------------------------------------------------------------------

SMALL_SEQS, SMALL_WAITING = 2, 4
BURST = 16
RETRY_FOR_SECONDS = 120.0


@pytest.fixture(scope="module")
def small_server(model_dir) -> Iterator[LiveServer]:
    """Two requests denoised at a time and four queued: easy to overload."""
    settings = ServerSettings(api_key=API_KEY, retry_after_seconds=1)
    yield from serve_in_thread(
        model_dir, settings, max_num_seqs=SMALL_SEQS, max_waiting=SMALL_WAITING, kv_cache_memory=16 * 2**20
    )


BURST_REQUEST = spec(PROMPTS[2], max_tokens=16, block_length=16)


async def _burst(server: LiveServer, n: int, retry: bool) -> list[list[Result]]:
    """n clients send BURST_REQUEST at once; with `retry`, each retries a 429 after its Retry-After."""

    async def one(client: httpx.AsyncClient) -> list[Result]:
        attempts = [await send(client, BURST_REQUEST, server.model)]
        give_up = time.monotonic() + RETRY_FOR_SECONDS
        while retry and attempts[-1].status == 429 and time.monotonic() < give_up:
            await asyncio.sleep(float(attempts[-1].headers["retry-after"]))
            attempts.append(await send(client, BURST_REQUEST, server.model))
        return attempts

    async with async_client(server, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(*(one(client) for _ in range(n)))


def test_a_burst_over_the_waiting_limit_gets_429_with_retry_after(small_server):
    solo = run(solo_texts(small_server, [BURST_REQUEST]))[BURST_REQUEST]
    results = [attempts[0] for attempts in run(_burst(small_server, BURST, retry=False))]
    refused = [r for r in results if r.status == 429]
    served = [r for r in results if r.status == 200]
    assert len(refused) + len(served) == BURST, [r.status for r in results]
    assert refused and len(served) >= SMALL_WAITING
    for r in refused:
        assert r.error["type"] == "rate_limit_error" and r.error["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
    assert all(r.text == solo for r in served)
    assert wait_until(lambda: engine_is_idle(small_server))


def test_refused_clients_that_retry_after_retry_after_are_all_served(small_server):
    solo = run(solo_texts(small_server, [BURST_REQUEST]))[BURST_REQUEST]
    attempts = run(_burst(small_server, BURST, retry=True))
    assert any(len(a) > 1 for a in attempts), "the burst never overloaded the server"
    assert [(a[-1].status, a[-1].text) for a in attempts] == [(200, solo)] * BURST
    assert wait_until(lambda: engine_is_idle(small_server))
    assert_still_serving(small_server)


# --- hostile input --------------------------------------------------------------------------------

COMPLETION = "/v1/completions"
CHAT = "/v1/chat/completions"
BASE = '"model": "{model}", "max_tokens": 4'  # spliced into raw JSON bodies below


@dataclass(frozen=True)
class Hostile:
    """A bad request: raw body bytes (with `{model}` and `{vocab}` to fill in) and the answer it must get."""

    path: str
    body: str | bytes
    status: int = 400
    param: str | None = None
    content_type: str = "application/json"

    def content(self, model: str, vocab: int, mask: int) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return self.body.replace("{model}", model).replace("{vocab}", str(vocab)).replace("{mask}", str(mask)).encode()


def completion_body(fields: str) -> str:
    return "{" + BASE + ", " + fields + "}"


HOSTILE = {
    # malformed JSON and the wrong shapes of body
    "truncated JSON": Hostile(COMPLETION, '{"prompt": "hi",'),
    "not JSON": Hostile(COMPLETION, "prompt=hi&max_tokens=4"),
    "JSON array body": Hostile(COMPLETION, '[{"prompt": "hi"}]'),
    "JSON null body": Hostile(COMPLETION, "null"),
    "deeply nested JSON": Hostile(COMPLETION, "[" * 20000 + "]" * 20000),
    "text/plain body": Hostile(COMPLETION, completion_body('"prompt": "hi"'), content_type="text/plain"),
    "invalid UTF-8 bytes": Hostile(COMPLETION, b'{"prompt": "\xff\xfe\xfd", "max_tokens": 4}'),
    "lone surrogate in the prompt": Hostile(COMPLETION, completion_body(r'"prompt": "hi \ud800"'), param="prompt"),
    "lone surrogate in a prompt list": Hostile(
        COMPLETION, completion_body(r'"prompt": ["hi", "\udfff"]'), param="prompt"
    ),
    "lone surrogate in a chat message": Hostile(
        CHAT, '{"max_tokens": 4, "messages": [{"role": "user", "content": "\\ud800"}]}', param="messages[0].content"
    ),
    "lone surrogate in the model name": Hostile(COMPLETION, r'{"model": "\ud800", "prompt": "hi"}', 404, "model"),
    "lone surrogate in a field name": Hostile(COMPLETION, completion_body(r'"prompt": "hi", "\ud800": 1')),
    # wrong types
    "prompt is an object": Hostile(COMPLETION, completion_body('"prompt": {"text": "hi"}'), param="prompt"),
    "prompt mixes text and ids": Hostile(COMPLETION, completion_body('"prompt": ["hi", 7]'), param="prompt"),
    "max_tokens is a string": Hostile(COMPLETION, '{"prompt": "hi", "max_tokens": "many"}', param="max_tokens"),
    "max_tokens is fractional": Hostile(COMPLETION, '{"prompt": "hi", "max_tokens": 4.5}', param="max_tokens"),
    "stream is a list": Hostile(COMPLETION, completion_body('"prompt": "hi", "stream": []'), param="stream"),
    "messages is a string": Hostile(CHAT, '{"messages": "hi"}', param="messages"),
    "unknown field": Hostile(COMPLETION, completion_body('"prompt": "hi", "temprature": 0'), param="temprature"),
    # empty and huge prompts
    "empty prompt": Hostile(COMPLETION, completion_body('"prompt": ""'), param="prompt"),
    "empty token list": Hostile(COMPLETION, completion_body('"prompt": []'), param="prompt"),
    "empty token list in a batch": Hostile(COMPLETION, completion_body('"prompt": [[]]'), param="prompt"),
    "no messages": Hostile(CHAT, '{"messages": []}', param="messages"),
    "prompt beyond the context": Hostile(
        COMPLETION, completion_body('"prompt": "' + "word " * 11000 + '"'), param="max_tokens"
    ),
    "max_tokens beyond the context": Hostile(COMPLETION, '{"prompt": "hi", "max_tokens": 1000000}', param="max_tokens"),
    # NaN, infinities, negative and huge numbers
    "NaN temperature": Hostile(COMPLETION, completion_body('"prompt": "hi", "temperature": NaN'), param="temperature"),
    "infinite top_p": Hostile(COMPLETION, completion_body('"prompt": "hi", "top_p": Infinity'), param="top_p"),
    "overflowing threshold": Hostile(
        COMPLETION, completion_body('"prompt": "hi", "threshold": 1e400'), param="threshold"
    ),
    "-Infinity factor": Hostile(
        COMPLETION, completion_body('"prompt": "hi", "unmask": "factor", "factor": -Infinity'), param="factor"
    ),
    "negative temperature": Hostile(
        COMPLETION, completion_body('"prompt": "hi", "temperature": -0.5'), param="temperature"
    ),
    "negative max_tokens": Hostile(COMPLETION, '{"prompt": "hi", "max_tokens": -1}', param="max_tokens"),
    "negative seed": Hostile(COMPLETION, completion_body('"prompt": "hi", "seed": -5'), param="seed"),
    "negative block_length": Hostile(
        COMPLETION, completion_body('"prompt": "hi", "block_length": -8'), param="block_length"
    ),
    "huge max_tokens": Hostile(COMPLETION, '{"prompt": "hi", "max_tokens": 1' + "0" * 30 + "}", param="max_tokens"),
    "seed beyond 64 bits": Hostile(
        COMPLETION, completion_body('"prompt": "hi", "seed": 18446744073709551616'), param="seed"
    ),
    "huge steps": Hostile(COMPLETION, completion_body('"prompt": "hi", "steps": 1' + "0" * 30), param="steps"),
    "huge factor": Hostile(
        COMPLETION, completion_body('"prompt": "hi", "unmask": "factor", "factor": 1e300'), param="factor"
    ),
    # unknown policies
    "unknown cache policy": Hostile(COMPLETION, completion_body('"prompt": "hi", "cache": "warp"'), param="cache"),
    "unknown unmask policy": Hostile(COMPLETION, completion_body('"prompt": "hi", "unmask": "oracle"'), param="unmask"),
    "unknown confidence": Hostile(
        COMPLETION, completion_body('"prompt": "hi", "confidence": "vibes"'), param="confidence"
    ),
    # oversized n
    "n of 17": Hostile(COMPLETION, completion_body('"prompt": "hi", "n": 17'), param="n"),
    "n of a billion": Hostile(CHAT, '{"messages": [{"role": "user", "content": "hi"}], "n": 1000000000}', param="n"),
    "more choices than the queue holds": Hostile(
        COMPLETION, completion_body('"prompt": [' + ",".join(['"a"'] * 10000) + '], "n": 16'), param="prompt"
    ),
    # token ids outside the vocabulary (and the one id no prompt may hold)
    "token id = vocabulary size": Hostile(COMPLETION, completion_body('"prompt": [5, {vocab}]'), param="prompt"),
    "negative token id": Hostile(COMPLETION, completion_body('"prompt": [-1]'), param="prompt"),
    "token id beyond 64 bits": Hostile(COMPLETION, completion_body('"prompt": [' + "9" * 25 + "]"), param="prompt"),
    "mask token id": Hostile(COMPLETION, completion_body('"prompt": [5, {mask}]'), param="prompt"),
    # other limits
    "seventeen stop strings": Hostile(
        COMPLETION,
        completion_body('"prompt": "hi", "stop": [' + ",".join(f'"s{i}"' for i in range(17)) + "]"),
        param="stop",
    ),
    "empty stop string": Hostile(COMPLETION, completion_body('"prompt": "hi", "stop": [""]'), param="stop"),
    "unknown chat role": Hostile(CHAT, '{"messages": [{"role": "root", "content": "hi"}]}', param="messages[0].role"),
}


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_input_gets_a_4xx_openai_error_and_the_server_keeps_serving(server, case):
    config = server.engine.engine.model_config
    content = case.content(server.model, config.vocab_size, config.mask_token_id)
    assert len(content) <= MAX_REQUEST_BYTES
    with server.http() as http:
        response = http.post(case.path, content=content, headers={"content-type": case.content_type})
    assert_openai_error(response, case.status, case.param)
    assert_still_serving(server)


# --- a request whose forward pass raises -------------------------------------------------------------

POISON_SEED = 666_666_666


class PoisonedForward:
    """The runner's fault hook: from its second step on, every forward pass that includes the
    request with POISON_SEED raises (batched or alone, as the engine retries it alone).

    Its first step runs, so by the time it fails the requests sent with it share its batch.
    The hook records the seeds of every forward it sees, to show they did.
    """

    def __init__(self) -> None:
        self.batches: list[list[int | None]] = []

    def __call__(self, work) -> None:
        seeds = [w.seq.params.seed for w in work]
        self.batches.append(seeds)
        if any(w.seq.params.seed == POISON_SEED and w.seq.stats.forward_passes >= 1 for w in work):
            raise RuntimeError("injected forward failure")

    @property
    def shared_a_batch(self) -> bool:
        return any(POISON_SEED in seeds and len(seeds) > 1 for seeds in self.batches)


@pytest.fixture
def poisoned_forward(server) -> Iterator[PoisonedForward]:
    hook = PoisonedForward()
    server.engine.engine.runner.fault_hook = hook
    try:
        yield hook
    finally:
        server.engine.engine.runner.fault_hook = None


def poisoned_spec(prompt: str, stream: bool = False) -> Spec:
    """The request PoisonedForward fails: it must live past its first step, so it ignores
    end-of-text (a trained model may commit it at once) and takes one token per step."""
    return spec(prompt, stream=stream, max_tokens=8, block_length=8, steps=8, ignore_eos=True, seed=POISON_SEED)


HEALTHY = [spec(PROMPTS[i % 4], chat=i % 3 == 2, stream=i % 2 == 1, max_tokens=16, block_length=16) for i in range(4)]


async def _healthy_and_poisoned(server: LiveServer, poisoned: Spec) -> tuple[list[Result], Result]:
    """Send the healthy requests and the poisoned one at once."""
    async with async_client(server) as client:
        results = await asyncio.gather(*(send(client, r, server.model) for r in [*HEALTHY, poisoned]))
        return list(results[:-1]), results[-1]


def test_a_request_whose_forward_raises_gets_500_and_the_rest_of_its_batch_finishes(server, poisoned_forward):
    solo = run(solo_texts(server, HEALTHY))
    healthy, bad = run(_healthy_and_poisoned(server, poisoned_spec(PROMPTS[0])))
    assert bad.status == 500
    assert bad.error["type"] == "server_error" and bad.error["code"] == "engine_error"
    assert "injected forward failure" in bad.error["message"]
    assert poisoned_forward.shared_a_batch
    for request, result in zip(HEALTHY, healthy):
        assert result.status == 200 and result.text == solo[request], request
    assert wait_until(lambda: engine_is_idle(server))
    assert_still_serving(server)


def test_a_stream_whose_forward_raises_ends_with_an_error_event_and_the_rest_finish(server, poisoned_forward):
    solo = run(solo_texts(server, HEALTHY))
    healthy, bad = run(_healthy_and_poisoned(server, poisoned_spec(PROMPTS[1], stream=True)))
    assert bad.status == 200 and not bad.done  # the stream had begun: the failure is its last event
    assert bad.error["code"] == "engine_error" and "injected forward failure" in bad.error["message"]
    assert poisoned_forward.shared_a_batch
    for request, result in zip(HEALTHY, healthy):
        assert result.status == 200 and result.text == solo[request], request
    assert wait_until(lambda: engine_is_idle(server))


# --- draining and SIGTERM ---------------------------------------------------------------------------

DRAIN_REQUEST = spec(PROMPTS[3], stream=True, max_tokens=48, block_length=48, steps=48, unmask="random", seed=2)


@pytest.fixture
def draining_server(model_dir) -> Iterator[LiveServer]:
    yield from serve_in_thread(model_dir, ServerSettings(api_key=API_KEY), max_num_seqs=4, kv_cache_memory=16 * 2**20)


async def _drain_with_streams_in_flight(server: LiveServer) -> tuple[list[Result], Result]:
    loop = server.server.servers[0].get_loop()  # uvicorn's event loop, in the server's thread
    async with async_client(server) as client:
        streams = [asyncio.ensure_future(send(client, DRAIN_REQUEST, server.model)) for _ in range(2)]
        while server.engine.num_running < 2:
            await asyncio.sleep(0.005)
        # What the app's lifespan does at shutdown: stop accepting, finish what is in flight.
        drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.engine.shutdown(), loop))
        late = await send(client, spec(PROMPTS[0], max_tokens=4), server.model)
        results = await asyncio.gather(*streams)
        await asyncio.wait_for(drained, 60)
        return list(results), late


def test_while_the_engine_drains_new_requests_get_503_and_in_flight_ones_finish(draining_server):
    solo = run(solo_texts(draining_server, [DRAIN_REQUEST]))[DRAIN_REQUEST]
    in_flight, late = run(_drain_with_streams_in_flight(draining_server))
    assert late.status == 503
    assert late.error["type"] == "service_unavailable_error" and late.error["code"] == "engine_unavailable"
    assert all(r.status == 200 and r.done and r.text == solo for r in in_flight)


URL_LINE = re.compile(r"Unmask is serving (\S+) at (http://\S+)/v1")


def start_unmask_serve(model_dir: Path, stderr, *options: str) -> tuple[subprocess.Popen, Address]:
    """`python -m unmask.server serve` on a free port, logging to `stderr` (a file); returns the process and its address."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("UNMASK_API_KEY", None)
    args = ["serve", str(model_dir), "--port", "0", "--api-key", API_KEY, "--kv-cache-memory", "32MiB", *options]
    proc = subprocess.Popen(
        [sys.executable, "-m", "unmask.server", *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=stderr
    )
    found: list[Address] = []

    def read_stdout() -> None:
        for line in proc.stdout:  # read to the end, so the child never blocks on a full pipe
            if match := URL_LINE.search(line):
                found.append(Address(match.group(2), API_KEY, match.group(1)))

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + 180
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not found:
        proc.kill()
        proc.wait()
        stderr.seek(0)
        raise AssertionError(f"unmask serve did not start; stderr:\n{stderr.read()}")
    return proc, found[0]


@contextmanager
def killed_at_exit(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Kill the server process at the end of the block if it is still running (a failed test)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


SIGTERM_STREAM = spec(
    PROMPTS[0], stream=True, stream_blocks=True, max_tokens=64, block_length=64, steps=64, unmask="random", seed=3
)
SIGTERM_PLAIN = spec(PROMPTS[1], max_tokens=64, block_length=64, steps=64, unmask="random", seed=4)
IN_FLIGHT = [SIGTERM_STREAM] * 4 + [SIGTERM_PLAIN] * 4  # with --max-num-seqs 4: four run, four wait


@dataclass
class SigtermRun:
    in_flight: list[Result]
    solo: dict[Spec, str]
    probes: list[str]  # each new connection tried after SIGTERM: "accepted" or "refused"
    refused_while_in_flight: bool
    exit_code: int
    stderr: str


def running_and_waiting(address: Address) -> float:
    samples = scrape(address.base_url)
    return sum(sample(samples, f"unmask_requests_{state}", model=address.model) for state in ("running", "waiting"))


def connect(address: Address) -> str:
    """Open (and close) a new TCP connection: 'accepted' or 'refused'."""
    host, port = address.base_url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        return "accepted"
    except ConnectionRefusedError:
        return "refused"


async def _sigterm_under_load(proc: subprocess.Popen, address: Address) -> tuple[list[Result], list[str], bool]:
    async with async_client(address) as client:
        in_flight = [asyncio.ensure_future(send(client, r, address.model)) for r in IN_FLIGHT]
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(running_and_waiting, address) < len(IN_FLIGHT) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        probes, refused_while_in_flight = [], False
        for _ in range(250):  # up to ~5 s: until a new connection is refused
            probes.append(connect(address))
            if probes[-1] == "refused":
                refused_while_in_flight = not all(task.done() for task in in_flight)
                break
            await asyncio.sleep(0.02)
        return list(await asyncio.gather(*in_flight)), probes, refused_while_in_flight


@pytest.fixture(scope="module")
def sigterm_run(model_dir) -> SigtermRun:
    with tempfile.TemporaryFile("w+") as stderr:
        proc, address = start_unmask_serve(model_dir, stderr, "--max-num-seqs", "4")
        try:
            solo = run(solo_texts(address, IN_FLIGHT))
            in_flight, probes, refused_while_in_flight = run(_sigterm_under_load(proc, address))
            exit_code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        return SigtermRun(in_flight, solo, probes, refused_while_in_flight, exit_code, stderr.read())


def test_sigterm_lets_every_in_flight_request_finish(sigterm_run):
    for request, result in zip(IN_FLIGHT, sigterm_run.in_flight):
        assert result.status == 200 and result.finish_reason in ("stop", "length"), result
        assert result.done or not request.stream
        assert result.text == sigterm_run.solo[request]


def test_after_sigterm_new_connections_are_refused_while_in_flight_requests_drain(sigterm_run):
    """uvicorn closes its listening socket within a fraction of a second of the signal, so
    a new client is refused (ECONNREFUSED) while the requests in flight still run. (The
    503 of a draining engine is what a request that reaches the app then would get: see
    the draining test above.)"""
    assert sigterm_run.probes[-1] == "refused", sigterm_run.probes
    assert len(sigterm_run.probes) < 100, "still accepting connections 2 s after SIGTERM"
    assert sigterm_run.refused_while_in_flight


def test_sigterm_exits_cleanly(sigterm_run):
    assert sigterm_run.exit_code == 0
    assert "Traceback" not in sigterm_run.stderr


def test_a_stalled_client_cannot_hold_up_the_exit_after_sigterm(model_dir):
    """A client that never finishes its upload keeps its request in flight forever; the
    shutdown timeout bounds how long SIGTERM waits for it."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc, address = start_unmask_serve(model_dir, stderr, "--shutdown-timeout", "1")
        host, port = address.base_url.removeprefix("http://").split(":")
        try:
            with socket.create_connection((host, int(port))) as stalled:
                stalled.sendall(
                    f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                    'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt": '.encode()
                )
                time.sleep(0.5)  # the server has the request, and waits for the rest of its body
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                exit_code = proc.wait(timeout=30)
                waited = time.monotonic() - signalled
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert exit_code == 0
    assert waited < 15


# Fixed steps (32 per block of 32, 256 tokens, end-of-text ignored): 256 steps, far more than
# fit in the shutdown timeout below, so these requests can only end by being cut.
OVERLOAD = dict(max_tokens=256, ignore_eos=True, block_length=32, steps=32, unmask="low_confidence")
OVERLOAD_RUNNING = [spec(PROMPTS[0], stream=True, **OVERLOAD), spec(PROMPTS[1], **OVERLOAD)]
OVERLOAD_QUEUED = [spec(PROMPTS[2], stream=True, **OVERLOAD), spec(PROMPTS[3], **OVERLOAD)]
OVERLOAD_TIMEOUT = 3.0


@dataclass
class Answered:
    result: Result
    seconds_after_sigterm: float


@dataclass
class OverloadShutdown:
    running: list[Answered]
    queued: list[Answered]
    exit_code: int
    exit_seconds: float
    stderr: str


def num_running(address: Address) -> float:
    return sample(scrape(address.base_url), "unmask_requests_running", model=address.model)


async def _answered(client: httpx.AsyncClient, request: Spec, model: str, sigterm: list[float]) -> Answered:
    result = await send(client, request, model)
    return Answered(result, time.monotonic() - sigterm[0] if sigterm else -1.0)


async def _sigterm_over_capacity(proc: subprocess.Popen, address: Address) -> tuple[list[Answered], list[Answered], float]:
    sigterm: list[float] = []
    async with async_client(address) as client:
        running = [asyncio.ensure_future(_answered(client, r, address.model, sigterm)) for r in OVERLOAD_RUNNING]
        assert await asyncio.to_thread(wait_until, lambda: num_running(address) == 2, 60)
        queued = [asyncio.ensure_future(_answered(client, r, address.model, sigterm)) for r in OVERLOAD_QUEUED]
        assert await asyncio.to_thread(wait_until, lambda: running_and_waiting(address) == 4, 60)
        sigterm.append(time.monotonic())
        proc.send_signal(signal.SIGTERM)
        return list(await asyncio.gather(*running)), list(await asyncio.gather(*queued)), sigterm[0]


@pytest.fixture(scope="module")
def overload_shutdown(model_dir) -> OverloadShutdown:
    with tempfile.TemporaryFile("w+") as stderr:
        options = ("--max-num-seqs", "2", "--shutdown-timeout", str(OVERLOAD_TIMEOUT))
        proc, address = start_unmask_serve(model_dir, stderr, *options)
        with killed_at_exit(proc):
            running, queued, signalled = run(_sigterm_over_capacity(proc, address))
            exit_code = proc.wait(timeout=60)
            exit_seconds = time.monotonic() - signalled
        stderr.seek(0)
        return OverloadShutdown(running, queued, exit_code, exit_seconds, stderr.read())


def assert_refused_as_unavailable(request: Spec, answered: Answered) -> None:
    """A 503 `engine_unavailable`; a stream (already 200) ends with that error event, then `[DONE]`."""
    result = answered.result
    assert result.error is not None and result.error["code"] == "engine_unavailable", result
    assert result.error["type"] == "service_unavailable_error" and result.error["message"]
    if request.stream:
        assert result.status == 200 and result.done, result
    else:
        assert result.status == 503, result


def test_at_the_shutdown_timeout_every_open_request_gets_a_503(overload_shutdown):
    for request, answered in zip(OVERLOAD_RUNNING, overload_shutdown.running):
        assert_refused_as_unavailable(request, answered)
        assert "shut" in answered.result.error["message"]
        assert answered.seconds_after_sigterm >= OVERLOAD_TIMEOUT - 0.5, answered  # they ran until the timeout


def test_at_shutdown_queued_requests_that_cannot_finish_in_time_are_refused_at_once(overload_shutdown):
    """At once: at the engine's next step, not at the timeout (a step of this batch takes up to
    a second on a shared CPU, so "at once" is measured against the timeout)."""
    cut = min(answered.seconds_after_sigterm for answered in overload_shutdown.running)
    for request, answered in zip(OVERLOAD_QUEUED, overload_shutdown.queued):
        assert_refused_as_unavailable(request, answered)
        assert "cannot finish" in answered.result.error["message"]
        assert answered.seconds_after_sigterm < min(OVERLOAD_TIMEOUT - 0.5, cut), (answered, cut)


def test_a_shutdown_under_overload_exits_cleanly_and_in_time(overload_shutdown):
    assert overload_shutdown.exit_code == 0
    assert overload_shutdown.exit_seconds < OVERLOAD_TIMEOUT + 10
    assert "Traceback" not in overload_shutdown.stderr
    assert "Task was destroyed" not in overload_shutdown.stderr


# --- security --------------------------------------------------------------------------------------


def v1_operations(server: LiveServer) -> list[tuple[str, str]]:
    """(method, path) of every /v1/* operation the server documents, path parameters filled in."""
    with server.http(auth=False) as http:
        paths = http.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "anything", path))
        for path, operations in paths.items()
        if path.startswith("/v1/")
        for method in operations
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {API_KEY[:-1]}"},  # a prefix of the key
        {"Authorization": f"Bearer {API_KEY}x"},  # the key and more
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"X-API-Key": API_KEY},
    ],
    ids=["none", "empty bearer", "wrong", "prefix", "suffix", "basic scheme", "no scheme", "other header"],
)
def test_every_v1_route_refuses_a_missing_or_wrong_key(server, headers):
    operations = v1_operations(server) + [("GET", "/v1/no-such-route")]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= {path for _, path in operations}
    with server.http(auth=False) as http:
        for method, path in operations:
            response = http.request(method, path, headers=headers, json={"prompt": "hi", "messages": []})
            assert_openai_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"


def test_the_api_key_is_compared_in_constant_time(server, monkeypatch):
    calls, compare_digest = [], hmac.compare_digest

    def spy(a, b) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    with server.http(auth=False) as http:
        assert http.get("/v1/models", headers=auth_headers("wrong")).status_code == 401
        assert http.get("/v1/models", headers=auth_headers()).status_code == 200
    assert calls == [(b"wrong", API_KEY.encode()), (API_KEY.encode(), API_KEY.encode())]


def test_a_body_over_the_limit_is_413_with_or_without_content_length(server):
    body = json.dumps({"model": server.model, "prompt": "x" * MAX_REQUEST_BYTES}).encode()

    def chunked():
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    with server.http() as http:
        declared = http.post(COMPLETION, content=body, headers={"content-type": "application/json"})
        streamed = http.post(COMPLETION, content=chunked(), headers={"content-type": "application/json"})
    assert "content-length" not in streamed.request.headers
    for response in (declared, streamed):
        assert assert_openai_error(response, 413)["code"] == "request_too_large"
    assert_still_serving(server)


TRAVERSALS = [
    "/v1/models/../../../../etc/passwd",
    "/v1/models/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/models/%2Fetc%2Fpasswd",
    "/v1/models//etc/passwd",
    "/v1/models/config.json",
    "/v1/models/{model_dir}/config.json",
    "/v1/models/{model}/../config.json",
    "/v1/models/{model}%2F..%2Ftokenizer.json",
    "/playground/..%2Fapp.py",
    "/playground/..%2F..%2Fmodels%2Funmask-tiny%2Fconfig.json",
    "/playground/%2Fetc%2Fpasswd",
    "/playground/__init__.py",
    "/static/../../etc/passwd",
    "/docs/../config.json",
    "/config.json",
    "/tokenizer.json",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_route_serves_a_file_for_a_path_like_parameter(server, model_dir, path):
    file_contents = ["root:x:0:0", (model_dir / "config.json").read_text()[:40], "from __future__"]
    with server.http() as http:
        response = http.get(path.format(model_dir=model_dir, model=server.model))
    assert_openai_error(response, 404)
    assert not any(content in response.text for content in file_contents)


def test_a_path_as_the_model_field_is_an_unknown_model(server, model_dir):
    with server.http() as http:
        for name in ("../../etc/passwd", str(model_dir), str(model_dir / "config.json")):
            response = http.post(COMPLETION, json={"model": name, "prompt": "hi", "max_tokens": 4})
            assert_openai_error(response, 404, "model")
            assert "root:x:0:0" not in response.text


def test_the_app_mounts_no_static_files(server):
    app = server.server.config.app
    assert not [route for route in app.routes if isinstance(route, Mount)]


def test_no_open_route_reveals_the_model_directory_or_the_key(server, model_dir):
    with server.http(auth=False) as http:
        paths = ("/", "/playground/config.json", "/health", "/metrics", "/openapi.json", "/docs")
        bodies = [http.get(path).text for path in paths]
    with server.http() as http:
        bodies.append(http.get("/v1/models").text)
    for body in bodies:
        assert str(model_dir.resolve()) not in body and API_KEY not in body

"""Operations: /metrics that move, disconnects that free the KV pool, and an accurate /openapi.json."""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import threading
import time

import httpx
import pytest
from server_fixtures import (  # noqa: F401  (live_server is a pytest fixture)
    live_server,
    model_dir_for_tests,
    sample,
    serve_in_thread,
    wait_until,
)

from unmask.engine.policies import UNMASK_POLICIES
from unmask.server import metrics as metrics_module
from unmask.server.settings import ServerSettings

PROMPT = "The quick brown fox"
# A long single-block canvas unmasked in random order: the committed run from the start
# (and so end-of-text) stays short for hundreds of steps, so the request cannot finish early.
LONG = {"max_tokens": 256, "block_length": 256, "steps": 256, "unmask": "random", "seed": 1}


def documented_metric_names() -> list[str]:
    return re.findall(r"^\s+(unmask_\w+)\{", metrics_module.__doc__, flags=re.MULTILINE)


def pool_is_full(server) -> bool:
    samples = server.metrics()
    return (
        sample(samples, "unmask_kv_pages_used", model=server.model) == 0
        and sample(samples, "unmask_requests_running", model=server.model) == 0
        and server.engine.kv_pages_free == server.engine.kv_pages_total
    )


def aborted(server) -> float:
    return sample(server.metrics(), "unmask_requests_finished_total", model=server.model, finish_reason="abort")


# --- metrics -----------------------------------------------------------------------------------------


def test_every_documented_metric_is_exported(live_server):
    # ignore_eos: the request finishes its block whatever the model writes, so per-block series exist too.
    live_server.openai().completions.create(model=live_server.model, prompt=PROMPT, max_tokens=8,
                                            extra_body={"ignore_eos": True})
    exported = {name for name, _ in live_server.metrics()}
    names = documented_metric_names()
    assert len(names) >= 18
    for name in names:
        assert any(e == name or e.startswith(name + "_") for e in exported), f"{name} is documented but not exported"
    assert all(name.startswith("unmask_") for name, _ in live_server.metrics())


def test_metrics_move_after_a_request(live_server):
    model = live_server.model
    before = live_server.metrics()
    result = live_server.openai().completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=16,
        extra_body={"block_length": 8, "cache": "dual", "unmask": "threshold"},
    )
    after = live_server.metrics()

    def grew(name: str, by: float | None = None, **labels) -> None:
        delta = sample(after, name, **labels) - sample(before, name, **labels)
        assert delta > 0 if by is None else delta == by, f"{name}{labels}: {delta}"

    grew("unmask_http_requests_total", 1, endpoint="/v1/completions", status="200")
    grew("unmask_http_request_duration_seconds_count", 1, endpoint="/v1/completions")
    grew("unmask_prompt_tokens_total", result.usage.prompt_tokens, model=model)
    grew("unmask_generation_tokens_total", result.usage.completion_tokens, model=model)
    grew("unmask_requests_finished_total", 1, model=model, finish_reason=result.choices[0].finish_reason)
    grew("unmask_e2e_request_latency_seconds_count", 1, model=model)
    grew("unmask_request_tokens_per_step_count", 1, model=model, cache="dual", unmask="threshold")
    grew("unmask_steps_per_block_count", model=model, cache="dual", unmask="threshold")
    for name in (
        "unmask_step_duration_seconds",
        "unmask_step_tokens_committed",
        "unmask_step_batch_size",
        "unmask_step_active_tokens",
    ):
        grew(name + "_count", model=model)
    assert sample(after, "unmask_kv_pages_total", model=model) == live_server.engine.kv_pages_total > 0
    assert sample(after, "unmask_engine_alive", model=model) == 1


def test_time_to_first_token_is_recorded_for_streams(live_server):
    before = sample(live_server.metrics(), "unmask_time_to_first_token_seconds_count", model=live_server.model)
    text = "".join(
        c.choices[0].text
        for c in live_server.openai().completions.create(
            model=live_server.model, prompt=PROMPT, max_tokens=16, stream=True
        )
    )
    after = sample(live_server.metrics(), "unmask_time_to_first_token_seconds_count", model=live_server.model)
    assert after - before == (1 if text else 0)


def test_errors_are_counted_by_status(live_server):
    before = sample(live_server.metrics(), "unmask_http_requests_total", endpoint="/v1/completions", status="401")
    httpx.post(f"{live_server.base_url}/v1/completions", json={"prompt": "x"})
    after = sample(live_server.metrics(), "unmask_http_requests_total", endpoint="/v1/completions", status="401")
    assert after - before == 1


# --- disconnects ---------------------------------------------------------------------------------------


def test_disconnect_mid_stream_aborts_and_returns_the_kv_pool_to_full(live_server):
    assert wait_until(lambda: pool_is_full(live_server))
    aborts = aborted(live_server)
    body = {"model": live_server.model, "prompt": PROMPT, "stream": True, "stream_blocks": True, **LONG}
    with live_server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"finish_reason":null' in first
        assert live_server.engine.kv_pages_free < live_server.engine.kv_pages_total  # the request holds pages now
    # leaving the block closed the connection mid-stream
    assert wait_until(lambda: pool_is_full(live_server)), "the aborted request kept its KV pages"
    assert aborted(live_server) == aborts + 1


def test_disconnect_while_waiting_for_a_plain_response_aborts(live_server):
    assert wait_until(lambda: pool_is_full(live_server))
    aborts = aborted(live_server)
    body = {"model": live_server.model, "prompt": PROMPT, **LONG}
    with live_server.http() as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_until(lambda: pool_is_full(live_server)), "the aborted request kept its KV pages"
    assert aborted(live_server) == aborts + 1
    assert wait_until(
        lambda: (
            sample(live_server.metrics(), "unmask_http_requests_total", endpoint="/v1/completions", status="499") >= 1
        )
    )


def test_other_requests_keep_streaming_while_one_client_leaves(live_server):
    client = live_server.openai()
    expected = (
        client.completions.create(model=live_server.model, prompt="Hello", max_tokens=32, temperature=0).choices[0].text
    )
    got: list[str] = []

    def stream_other() -> None:
        for chunk in client.completions.create(
            model=live_server.model, prompt="Hello", max_tokens=32, temperature=0, stream=True
        ):
            got.append(chunk.choices[0].text)

    body = {"model": live_server.model, "prompt": PROMPT, "stream": True, "stream_blocks": True, **LONG}
    with live_server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())
        other = threading.Thread(target=stream_other)
        other.start()
        time.sleep(0.2)
    other.join(60)
    assert "".join(got) == expected
    assert wait_until(lambda: pool_is_full(live_server))


# --- slow prompts -------------------------------------------------------------------------------------------

SLOW = " [tokenized slowly]"


@pytest.fixture
def slow_tokenizer(live_server, monkeypatch):
    """Text containing SLOW tokenizes only once the test sets `release`, as a huge prompt takes its time.

    Yields (entered, release): `entered` is set once such a text is being tokenized.
    """
    tokenizer = live_server.engine.tokenizer
    encode = tokenizer.encode
    entered, release = threading.Event(), threading.Event()

    def gated_encode(text, *args, **kwargs):
        if SLOW in text:
            entered.set()
            release.wait(60)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", gated_encode)
    yield entered, release
    release.set()


@pytest.mark.parametrize(
    "path,fields",
    [
        ("/v1/completions", {"prompt": PROMPT + SLOW}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT + SLOW}]}),
    ],
)
def test_health_answers_while_a_prompt_is_being_tokenized(live_server, slow_tokenizer, path, fields):
    entered, release = slow_tokenizer
    responses: list[httpx.Response] = []

    def generate() -> None:
        with live_server.http() as http:
            responses.append(http.post(path, json={"model": live_server.model, "max_tokens": 8, **fields}))

    client = threading.Thread(target=generate)
    client.start()
    assert entered.wait(30), "the prompt never reached the tokenizer"
    with live_server.http(auth=False) as http:
        health = http.get("/health", timeout=10)  # times out if tokenizing blocks the event loop
    assert health.status_code == 200
    release.set()
    client.join(60)
    assert responses[0].status_code == 200
    assert responses[0].json()["usage"]["completion_tokens"] <= 8


# --- OpenAPI -----------------------------------------------------------------------------------------------


def test_openapi_describes_every_endpoint_and_extension_field(live_server):
    with live_server.http(auth=False) as http:
        schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(paths)
    components = schema["components"]["schemas"]
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        fields = components[request]["properties"]
        for name in (
            "block_length",
            "steps",
            "cache",
            "unmask",
            "threshold",
            "factor",
            "stream_blocks",
            "stream_options",
            "seed",
        ):
            assert name in fields, f"{request}.{name} is missing"
    assert "max_completion_tokens" in components["ChatCompletionRequest"]["properties"]
    assert {"CompletionChunk", "ChatCompletionChunk", "BlockState", "ErrorResponse"} <= set(components)
    completions = paths["/v1/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(completions["responses"])
    assert "422" not in completions["responses"]  # validation errors are 400 here
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert completions["security"] == [{"bearer": []}]
    assert "security" not in paths["/health"]["get"]


# --- a dead engine ---------------------------------------------------------------------------------------------


class _EngineCrash(BaseException):
    """Not an `Exception`: escapes the engine's per-request isolation and ends its loop."""


@pytest.fixture
def crashing_server(tmp_path_factory):
    yield from serve_in_thread(model_dir_for_tests(tmp_path_factory), ServerSettings(), kv_cache_memory=16 * 2**20)


def test_a_dead_engine_fails_health_and_new_requests_but_not_the_server(crashing_server, monkeypatch):
    server = crashing_server
    policy = UNMASK_POLICIES["low_confidence"]
    original = policy.choose

    def choose(seq, confidence):
        if seq.params.seed == 666:
            raise _EngineCrash()
        return original(seq, confidence)

    monkeypatch.setattr(policy, "choose", choose)
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 8, "seed": 666}
    with server.http() as http:
        crashed = http.post("/v1/completions", json=body)
        assert crashed.status_code == 500 and crashed.json()["error"]["type"] == "server_error"
        assert wait_until(lambda: http.get("/health").status_code == 503)
        assert http.get("/health").json() == {"status": "unavailable"}
        refused = http.post("/v1/completions", json={**body, "seed": 1})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        assert sample(server.metrics(), "unmask_engine_alive", model=server.model) == 0


# --- why requests wait ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pool_server(tmp_path_factory):
    """Two sequence slots and a KV pool of a few hundred tokens, so either one can be what runs out."""
    model_dir = model_dir_for_tests(tmp_path_factory)
    yield from serve_in_thread(model_dir, ServerSettings(), max_num_seqs=2, kv_cache_memory=8 * 2**20)


def waiting_for(server) -> dict[str, float]:
    samples = server.metrics()
    resources = ("kv_pages", "sequence_slot", "admission")
    return {r: sample(samples, "unmask_requests_waiting_for", model=server.model, resource=r) for r in resources}


@pytest.mark.parametrize(
    "canvas_tokens, resource",
    [(16, "sequence_slot"), (None, "kv_pages")],  # None: more than half the pool's tokens each
    ids=["slots full", "pages full"],
)
def test_metrics_say_whether_waiting_requests_wait_for_pages_or_sequence_slots(small_pool_server, canvas_tokens, resource):
    server = small_pool_server
    pool_tokens = server.engine.kv_pages_total * server.engine.engine.pool.page_size
    max_tokens = canvas_tokens or pool_tokens // 2 + 16
    body = {"prompt": PROMPT, "stream": True, **LONG, "max_tokens": max_tokens, "block_length": max_tokens, "steps": max_tokens}
    with httpx.Client(base_url=server.base_url, timeout=60) as http, contextlib.ExitStack() as streams:
        for _ in range(3):  # one more than the slots (or two more than the pages hold)
            streams.enter_context(http.stream("POST", "/v1/completions", json=body))
        # Until the engine thread has queued them, new requests wait for admission only.
        assert wait_until(lambda: waiting_for(server)[resource] >= 1), waiting_for(server)
        counts, waiting = waiting_for(server), server.engine.num_waiting
    assert counts[resource] == sum(counts.values()) == waiting, counts
    assert wait_until(lambda: pool_is_full(server))  # the streams were closed: everything aborted


# --- no task outlives its request ------------------------------------------------------------------------


def test_no_task_is_left_pending_after_clients_disconnect(live_server, caplog):
    assert wait_until(lambda: pool_is_full(live_server))
    body = {"model": live_server.model, "prompt": "1 + 2 =", "max_tokens": 256, "ignore_eos": True, "stream": True}
    for _ in range(8):  # each client leaves after the first event, closing its connection
        with live_server.http() as http, http.stream("POST", "/v1/completions", json={**body, "stream_blocks": True}) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        time.sleep(0.1)
    for _ in range(2):  # and these before their plain answer
        with live_server.http() as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(30, read=0.5))
    assert wait_until(lambda: pool_is_full(live_server))
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()  # a pending task nothing refers to any more is destroyed (and reported) here
    destroyed = [r.getMessage() for r in caplog.records if "Task was destroyed but it is pending" in r.getMessage()]
    assert not destroyed, destroyed

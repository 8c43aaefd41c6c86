"""Every failure is an OpenAI-shaped error with the right status, and none of them hurts the server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from server_fixtures import API_KEY, MAX_REQUEST_BYTES, MAX_WAITING, live_server  # noqa: F401  (pytest fixture)

from unmask.engine.policies import UNMASK_POLICIES

PROMPT = "The quick brown fox"


def post(server, path: str, body=None, *, content: bytes | None = None, auth: bool = True, headers=None):
    with server.http(auth=auth) as http:
        if content is not None:
            return http.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})
        return http.post(path, json=body, headers=headers)


def completion(server, **fields) -> dict:
    return {"model": server.model, "prompt": PROMPT, "max_tokens": 8, "block_length": 8, **fields}


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# --- 400: the request is wrong ---------------------------------------------------------------------


def test_malformed_json_is_400(live_server):
    assert_error(post(live_server, "/v1/completions", content=b'{"prompt": "x",'), 400, code="invalid_json")


def test_missing_body_is_400(live_server):
    assert_error(post(live_server, "/v1/chat/completions", content=b""), 400)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"prompt": 3.5}, "prompt"),
        ({"prompt": [[False]]}, "prompt"),  # JSON booleans are not token ids
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"stream": 1}, "stream"),
        ({"stop": 7}, "stop"),
        ({"cache": "nope"}, "cache"),
        ({"unmask": "nope"}, "unmask"),
        ({"stream_blocks": "sometimes"}, "stream_blocks"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"block_lenght": 8}, "block_lenght"),
    ],
)
def test_invalid_completion_field_is_400_naming_it(live_server, fields, param):
    assert_error(post(live_server, "/v1/completions", completion(live_server, **fields)), 400, param)


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ],
)
def test_invalid_chat_message_is_400_naming_it(live_server, messages, param):
    body = {"model": live_server.model, "messages": messages, "max_tokens": 8}
    assert_error(post(live_server, "/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"threshold": 1.5}, "threshold"),
        ({"steps": 9}, "steps"),  # more steps than the block has tokens
    ],
)
def test_value_the_engine_rejects_is_400_naming_it(live_server, fields, param):
    assert_error(post(live_server, "/v1/completions", completion(live_server, **fields)), 400, param)


def test_prompt_plus_max_tokens_beyond_the_context_is_400(live_server):
    too_many = live_server.engine.max_model_len
    error = assert_error(
        post(live_server, "/v1/completions", completion(live_server, max_tokens=too_many)), 400, "max_tokens"
    )
    assert str(too_many) in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_prompt_of_most_of_the_body_limit_is_400_for_the_context(live_server, path):
    text = "The quick brown fox jumps over the lazy dog. " * (MAX_REQUEST_BYTES // 64)
    prompt = {"prompt": text} if path == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    response = post(live_server, path, {"model": live_server.model, "max_tokens": 8, **prompt})
    error = assert_error(response, 400, "max_tokens")
    assert str(live_server.engine.max_model_len) in error["message"]


@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/completions", {"logprobs": 1, "stream": True}, "logprobs"),
        ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/chat/completions", {"logprobs": True, "stream": True}, "logprobs"),
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"logit_bias": {"42": 1.0}}, "logit_bias"),
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_unsupported_openai_feature_is_a_clear_400(live_server, path, fields, param):
    if path == "/v1/completions":
        body = completion(live_server, **fields)
    else:
        body = {"model": live_server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **fields}
    error = assert_error(post(live_server, path, body), 400, param, "unsupported_parameter")
    assert "not supported" in error["message"]


def test_the_openai_client_raises_bad_request_with_the_param(live_server):
    with pytest.raises(openai.BadRequestError) as caught:
        live_server.openai().completions.create(
            model=live_server.model, prompt=PROMPT, max_tokens=8, extra_body={"cache": "nope"}
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "cache"


# --- 401, 404, 413, 429 ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}])
def test_v1_without_the_right_key_is_401(live_server, headers):
    with live_server.http(auth=False) as http:
        for response in (
            http.get("/v1/models", headers=headers),
            http.post("/v1/completions", content=b"{bad", headers=headers),
        ):
            assert_error(response, 401, code="invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"


def test_the_openai_client_with_a_wrong_key_gets_authentication_error(live_server):
    client = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_and_metrics_need_no_key(live_server):
    with live_server.http(auth=False) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_unknown_model_is_404(live_server):
    error = assert_error(post(live_server, "/v1/completions", completion(live_server, model="gpt-9")), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        live_server.openai().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_unknown_route_is_an_openai_shaped_404(live_server):
    with live_server.http() as http:
        assert_error(http.get("/v1/engines"), 404)


def test_wrong_method_is_an_openai_shaped_405(live_server):
    with live_server.http() as http:
        response = http.get("/v1/completions")
    assert_error(response, 405)
    assert "POST" in response.headers["allow"]


def test_body_over_the_limit_is_413(live_server):
    huge = completion(live_server, prompt="x" * (MAX_REQUEST_BYTES + 1))
    assert_error(post(live_server, "/v1/completions", huge), 413, code="request_too_large")


def test_chunked_body_over_the_limit_is_413(live_server):
    chunks = (b"x" * 65536 for _ in range(MAX_REQUEST_BYTES // 65536 + 2))
    with live_server.http() as http:
        response = http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert_error(response, 413, code="request_too_large")


def test_more_choices_than_the_waiting_queue_holds_is_400_not_429(live_server):
    # No retry could ever queue it. (A queue that is full now gets a 429 with Retry-After:
    # see tests/test_reliability.py, which overloads a live server.)
    body = completion(live_server, n=4 * MAX_WAITING, max_tokens=64, block_length=64)
    response = post(live_server, "/v1/completions", body)
    assert_error(response, 400, "n", code="too_many_choices")
    assert post(live_server, "/v1/completions", completion(live_server)).status_code == 200  # nothing leaked


# --- 500: the engine fails on one request ---------------------------------------------------------


@pytest.fixture
def failing_factor_policy(monkeypatch):
    """Fault injection into the real engine: `unmask=factor` with factor 13 raises inside the engine step."""
    policy = UNMASK_POLICIES["factor"]
    original = policy.choose

    def choose(seq, confidence):
        if seq.params.factor == 13.0:
            raise RuntimeError("injected failure")
        return original(seq, confidence)

    monkeypatch.setattr(policy, "choose", choose)


def test_engine_failure_is_500_for_that_request_only(live_server, failing_factor_policy):
    bad = completion(live_server, unmask="factor", factor=13.0)
    good = completion(live_server, unmask="factor", factor=1.0, max_tokens=32)
    with ThreadPoolExecutor(2) as pool:
        bad_response, good_response = pool.map(lambda body: post(live_server, "/v1/completions", body), [bad, good])
    error = assert_error(bad_response, 500, code="engine_error")
    assert "injected failure" in error["message"]
    assert good_response.status_code == 200
    assert post(live_server, "/v1/completions", completion(live_server)).status_code == 200
    with live_server.http() as http:
        assert http.get("/health").status_code == 200


def test_engine_failure_mid_stream_ends_the_stream_with_an_error_event(live_server, failing_factor_policy):
    client = live_server.openai()
    with pytest.raises(openai.APIError, match="injected failure"):
        for _ in client.completions.create(
            model=live_server.model,
            prompt=PROMPT,
            max_tokens=8,
            stream=True,
            extra_body={"unmask": "factor", "factor": 13.0},
        ):
            pass


# --- OpenAI defaults sent explicitly ------------------------------------------------------------------

CHAT = "/v1/chat/completions"
# What OpenAI SDKs, proxies and clients that copy a request template send, each at the value that
# changes nothing: every one is accepted.
NO_OP_COMPLETION_FIELDS = {
    "best_of": 1,
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "user": "someone",
    "echo": False,
    "stream": False,
    "seed": None,
    "stop": None,
    "suffix": None,
    "logprobs": None,
}
NO_OP_CHAT_FIELDS = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
    "user": "someone",
    "logprobs": False,
    "top_logprobs": None,
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "store": False,
    "metadata": {"team": "a"},
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "prediction": None,
    "modalities": ["text"],
    "functions": [],
    "function_call": "none",
    "audio": None,
    "reasoning_effort": None,
    "verbosity": None,
    "web_search_options": None,
    "response_format": {"type": "text"},
}


def chat(server, **fields) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **fields}


def test_a_completion_with_every_openai_default_sent_explicitly_is_answered(live_server):
    plain = post(live_server, "/v1/completions", completion(live_server))
    explicit = post(live_server, "/v1/completions", completion(live_server, **NO_OP_COMPLETION_FIELDS))
    assert explicit.status_code == 200, explicit.text
    assert explicit.json()["choices"] == plain.json()["choices"]


def test_a_chat_with_every_openai_default_sent_explicitly_is_answered(live_server):
    plain = post(live_server, CHAT, chat(live_server))
    explicit = post(live_server, CHAT, chat(live_server, **NO_OP_CHAT_FIELDS))
    assert explicit.status_code == 200, explicit.text
    assert explicit.json()["choices"] == plain.json()["choices"]


def test_an_assistant_message_sent_back_as_the_sdk_returned_it_is_accepted(live_server):
    reply = live_server.openai().chat.completions.create(
        model=live_server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    history = [{"role": "user", "content": "hi"}, reply.choices[0].message.model_dump(), {"role": "user", "content": "ok"}]
    response = post(live_server, CHAT, {"model": live_server.model, "messages": history, "max_tokens": 8})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/completions", {"best_of": 3}, "best_of"),
        (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
        (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        (CHAT, {"reasoning_effort": "high"}, "reasoning_effort"),
        (CHAT, {"functions": [{"name": "f"}]}, "functions"),
        (CHAT, {"function_call": "auto"}, "function_call"),
        (CHAT, {"web_search_options": {}}, "web_search_options"),
    ],
)
def test_a_value_that_would_change_the_result_is_still_unsupported(live_server, path, fields, param):
    body = completion(live_server, **fields) if path == "/v1/completions" else chat(live_server, **fields)
    error = assert_error(post(live_server, path, body), 400, param, "unsupported_parameter")
    assert "not supported" in error["message"]


# --- bodies that are not a JSON object ------------------------------------------------------------------


def test_a_form_encoded_body_is_told_to_send_json(live_server):
    """`curl -d '{...}'` without `-H 'Content-Type: application/json'` sends form data."""
    with live_server.http() as http:
        response = http.post("/v1/completions", content=b'{"prompt": "hi"}', headers={"content-type": "application/x-www-form-urlencoded"})
    error = assert_error(response, 400, None, "invalid_content_type")
    assert "application/json" in error["message"] and "application/x-www-form-urlencoded" in error["message"]


def test_invalid_utf8_is_a_400_that_says_so(live_server):
    error = assert_error(post(live_server, "/v1/completions", content=b'{"prompt": "\xff\xfe"}'), 400, None, "invalid_encoding")
    assert "UTF-8" in error["message"]


def test_a_json_array_is_told_to_be_an_object(live_server):
    error = assert_error(post(live_server, CHAT, content=b"[1, 2]"), 400, None, "invalid_json")
    assert "JSON object" in error["message"] and "array" in error["message"]


@pytest.mark.parametrize(
    "field, literal",
    [("temperature", "NaN"), ("top_p", "Infinity"), ("threshold", "-Infinity"), ("factor", "1e999")],
)
def test_a_non_finite_number_is_named_with_its_field(live_server, field, literal):
    content = f'{{"prompt": "hi", "max_tokens": 8, "{field}": {literal}}}'.encode()
    error = assert_error(post(live_server, "/v1/completions", content=content), 400, field, "invalid_value")
    assert literal in error["message"] and "finite" in error["message"]


def test_a_non_finite_number_inside_a_message_is_named_by_its_path(live_server):
    content = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": NaN}]}]}'
    assert_error(post(live_server, CHAT, content=content), 400, "messages[0].content[0].text", "invalid_value")

"""logprobs over HTTP: the legacy completions object (echo scores the prompt), chat's format, top_k / min_p."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import httpx
import pytest

from dense_reference import masked_suffix_logprobs
from server_fixtures import LiveServer, live_server, serve_in_thread  # noqa: F401  (live_server: a fixture)
from unmask.engine.models import load_model
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.server.settings import ServerSettings

MAX_SCORE_TOKENS = 24
PROMPT = [5, 9, 12, 7, 30, 2, 41, 8, 17, 23]


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("logprobs-llada"), arch="llada", layers=2, hidden=64, heads=4)


@pytest.fixture(scope="module")
def server(random_dir) -> Iterator[LiveServer]:
    yield from serve_in_thread(random_dir, ServerSettings(), kv_cache_memory=2**24, max_score_tokens=MAX_SCORE_TOKENS)


def complete(server: LiveServer, **body) -> dict:
    with server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def refusal(server: LiveServer, path: str, **body) -> dict:
    with server.http() as http:
        response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_echo_with_logprobs_scores_every_prompt_token_as_the_direct_computation(server, random_dir):
    """lm-eval's loglikelihood request, exactly as it sends it."""
    body = complete(server, prompt=[PROMPT], max_tokens=1, logprobs=1, echo=True, temperature=0, seed=1234)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(PROMPT) + 1  # the prompt, then the generated token
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = [logprob for logprob, _ in masked_suffix_logprobs(random_dir, PROMPT)]
    assert logprobs["token_logprobs"][1 : len(PROMPT)] == pytest.approx(expected, abs=1e-4)


def test_each_top_logprobs_entry_holds_the_token_and_the_best_alternative(server):
    body = complete(server, prompt=PROMPT, max_tokens=1, logprobs=1, echo=True)
    logprobs = body["choices"][0]["logprobs"]
    for token, value, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert top[token] == pytest.approx(value)
        assert max(top.values()) >= value and 1 <= len(top) <= 2


def test_text_offsets_locate_each_token_in_the_echoed_text(server, random_dir):
    """The echoed prompt writes its special tokens out; generated text leaves them out (they still have entries)."""
    special = set(load_model(random_dir).tokenizer.all_special_tokens)
    body = complete(server, prompt=PROMPT, max_tokens=6, logprobs=0, echo=True, ignore_eos=True)
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(PROMPT) + 6
    located = list(zip(logprobs["text_offset"], logprobs["tokens"]))
    shown = located[: len(PROMPT)] + [(o, t) for o, t in located[len(PROMPT) :] if t not in special]
    assert choice["text"] == "".join(token for _, token in shown)
    assert all(choice["text"][offset : offset + len(token)] == token for offset, token in shown)


def test_max_tokens_zero_with_echo_only_scores_the_prompt(server, random_dir):
    body = complete(server, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(PROMPT) and body["usage"]["completion_tokens"] == 0
    expected = [logprob for logprob, _ in masked_suffix_logprobs(random_dir, PROMPT)]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)


def test_max_tokens_zero_without_scoring_is_refused(server):
    error = refusal(server, "/v1/completions", prompt=PROMPT, max_tokens=0)
    assert error["param"] == "max_tokens"


def test_echo_scoring_is_refused_above_the_documented_prompt_length(server):
    error = refusal(server, "/v1/completions", prompt=list(range(5, 5 + MAX_SCORE_TOKENS + 1)), max_tokens=1, logprobs=1, echo=True)
    assert error["param"] == "prompt" and f"at most {MAX_SCORE_TOKENS} tokens" in error["message"]
    assert complete(server, prompt=PROMPT, max_tokens=2)["choices"][0]["finish_reason"]  # the server is fine


def test_generated_tokens_carry_commit_time_logprobs_without_echo(server):
    body = complete(server, prompt=PROMPT, max_tokens=6, logprobs=2, ignore_eos=True, seed=0)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 6 == body["usage"]["completion_tokens"]
    assert logprobs["text_offset"][0] == 0
    assert all(v is not None and v <= 0 for v in logprobs["token_logprobs"])


def test_each_choice_of_n_gets_its_own_logprobs(server):
    body = complete(server, prompt=PROMPT, max_tokens=4, logprobs=1, n=2, temperature=1.0, seed=5, ignore_eos=True)
    assert [len(c["logprobs"]["tokens"]) for c in body["choices"]] == [4, 4]


def test_streaming_with_logprobs_is_refused(server):
    error = refusal(server, "/v1/completions", prompt=PROMPT, max_tokens=2, logprobs=1, stream=True)
    assert error["param"] == "logprobs" and error["code"] == "unsupported_parameter"


def test_chat_logprobs_list_each_token_with_its_alternatives(server, random_dir):
    special = set(load_model(random_dir).tokenizer.all_special_tokens)
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "logprobs": True, "top_logprobs": 2, "ignore_eos": True},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    assert "".join(entry["token"] for entry in content if entry["token"] not in special) == choice["message"]["content"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 2
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


def test_chat_top_logprobs_without_logprobs_is_refused(server):
    error = refusal(server, "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert error["param"] == "top_logprobs"


def test_a_chat_without_logprobs_has_null_logprobs(server):
    with server.http() as http:
        body = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
    assert body["choices"][0]["logprobs"] is None


def test_top_k_one_over_http_gives_the_greedy_text(server):
    greedy = complete(server, prompt=PROMPT, max_tokens=8, ignore_eos=True)["choices"][0]["text"]
    sampled = complete(server, prompt=PROMPT, max_tokens=8, ignore_eos=True, temperature=5.0, seed=2, top_k=1)
    with_min_p = complete(server, prompt=PROMPT, max_tokens=8, ignore_eos=True, temperature=5.0, seed=2, min_p=1.0)
    assert sampled["choices"][0]["text"] == greedy == with_min_p["choices"][0]["text"]


@pytest.mark.parametrize("field,value", [("top_k", -2), ("min_p", 1.5), ("logprobs", 21)])
def test_out_of_range_fields_are_refused_by_name(server, field, value):
    assert refusal(server, "/v1/completions", prompt=PROMPT, max_tokens=2, **{field: value})["param"] == field


SORT = "Sort these numbers from smallest to largest: 42, 7, 19"


def test_a_completion_ended_by_end_of_text_lists_that_token_last(live_server):
    prompt = f"<|user|>\n{SORT}<|eot|>\n<|assistant|>\n"  # the bundled chat template, as a raw prompt
    body = complete(live_server, prompt=prompt, max_tokens=32, logprobs=0)
    choice = body["choices"][0]
    tokens = choice["logprobs"]["tokens"]
    assert choice["text"] == "Answer: 7, 19, 42" and choice["finish_reason"] == "stop"
    assert tokens[-1] == "<|endoftext|>" and "".join(tokens[:-1]) == choice["text"]
    assert len(tokens) == body["usage"]["completion_tokens"] + 1


def test_a_stop_string_cuts_the_logprobs_with_the_text(live_server):
    with live_server.http() as http:
        body = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": SORT}], "max_tokens": 32, "stop": [", 19"], "logprobs": True},
        ).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Answer: 7"
    assert "".join(entry["token"] for entry in choice["logprobs"]["content"]) == "Answer: 7"


# --- scoring that ends early: the client leaves, the server shuts down ----------------------------------

# One position per chunk: scoring this prompt takes about a thousand chunks, seconds of work.
LONG_SCORING = {"prompt": [5 + i % 500 for i in range(1000)], "echo": True, "logprobs": 0, "max_tokens": 0}


@pytest.fixture()
def slow_scoring_server(random_dir) -> Iterator[LiveServer]:
    """A server of its own (a test may drain it) that scores one position per chunk."""
    yield from serve_in_thread(random_dir, ServerSettings(), kv_cache_memory=2**22, max_num_batched_tokens=1)


def scoring_under_way(server: LiveServer):
    """The job being scored, once the engine has begun it."""
    deadline = time.monotonic() + 20
    while not server.engine._scoring:
        assert time.monotonic() < deadline, "the scoring never began"
        time.sleep(0.01)
    return server.engine._scoring[0].job


def scoring_stopped(server: LiveServer) -> bool:
    deadline = time.monotonic() + 20
    while server.engine._scoring or server.engine._scoring_open:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_that_leaves_while_its_prompt_is_scored_stops_the_scoring(slow_scoring_server):
    def leave_early() -> None:
        with slow_scoring_server.http() as http, pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=LONG_SCORING, timeout=httpx.Timeout(30, read=1.0))

    client = threading.Thread(target=leave_early)
    client.start()
    job = scoring_under_way(slow_scoring_server)
    client.join()
    assert scoring_stopped(slow_scoring_server) and not job.done  # dropped, not scored to the end


def test_scoring_still_under_way_at_the_shutdown_deadline_is_a_503(slow_scoring_server):
    answer: list[httpx.Response] = []

    def score() -> None:
        with slow_scoring_server.http() as http:
            answer.append(http.post("/v1/completions", json=LONG_SCORING, timeout=60))

    client = threading.Thread(target=score)
    client.start()
    job = scoring_under_way(slow_scoring_server)
    slow_scoring_server.engine.begin_drain(timeout=0.3)
    client.join(30)
    assert answer and answer[0].status_code == 503, answer and answer[0].text
    error = answer[0].json()["error"]
    assert error["code"] == "engine_unavailable" and "shutdown timeout" in error["message"]
    assert scoring_stopped(slow_scoring_server) and not job.done

"""/tokenize, /detokenize and /tokenizer_info, in vLLM's shapes, as lm-eval's remote tokenizer uses them."""

from __future__ import annotations

import pytest
from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

from server_fixtures import API_KEY, live_server  # noqa: F401  (a pytest fixture)

TEXT = "Sort these numbers from smallest to largest: 42, 7, 19"
MESSAGES = [{"role": "user", "content": TEXT}]


def post(live_server, path: str, **body):
    with live_server.http() as http:
        return http.post(path, json=body)


def test_tokenize_returns_the_engine_tokenizers_ids(live_server):
    body = post(live_server, "/tokenize", prompt=TEXT, add_special_tokens=False).json()
    expected = live_server.engine.tokenizer.encode(TEXT, add_special_tokens=False)
    assert body == {"count": len(expected), "max_model_len": live_server.engine.max_model_len, "tokens": expected, "token_strs": None}


def test_tokenize_returns_token_strings_on_request(live_server):
    body = post(live_server, "/tokenize", prompt=TEXT, return_token_strs=True).json()
    assert body["token_strs"] == live_server.engine.tokenizer.convert_ids_to_tokens(body["tokens"])


def test_tokenized_messages_are_the_prompt_a_chat_request_sends(live_server):
    tokens = post(live_server, "/tokenize", messages=MESSAGES).json()["tokens"]
    chat = post(live_server, "/v1/chat/completions", messages=MESSAGES, max_tokens=32).json()
    assert len(tokens) == chat["usage"]["prompt_tokens"]
    assert post(live_server, "/detokenize", tokens=tokens).json()["prompt"] == f"<|user|>\n{TEXT}<|eot|>\n<|assistant|>\n"


def test_messages_take_add_special_tokens(live_server):
    plain = post(live_server, "/tokenize", messages=MESSAGES).json()["tokens"]
    special = post(live_server, "/tokenize", messages=MESSAGES, add_special_tokens=True).json()["tokens"]
    # The bundled tokenizer adds no special tokens of its own: the template already wrote them.
    assert special == plain == live_server.engine.tokenizer.encode(
        live_server.engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    )


def test_detokenize_inverts_tokenize(live_server):
    tokens = post(live_server, "/tokenize", prompt=TEXT).json()["tokens"]
    assert post(live_server, "/detokenize", tokens=tokens).json() == {"prompt": TEXT}


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/detokenize", {"tokens": [10**6]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"prompt": "a", "extra": 1}, "extra"),
    ],
)
def test_bad_tokenizer_requests_are_refused_by_field(live_server, path, body, param):
    response = post(live_server, path, **body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_a_body_that_is_not_a_json_object_is_a_clear_400(live_server, path):
    with live_server.http() as http:
        form = http.post(path, content=b'{"prompt": "hi"}', headers={"content-type": "application/x-www-form-urlencoded"})
        non_finite = http.post(path, content=b'{"tokens": [NaN]}', headers={"content-type": "application/json"})
    assert form.status_code == 400 and form.json()["error"]["code"] == "invalid_content_type"
    assert non_finite.status_code == 400 and non_finite.json()["error"]["param"] == "tokens[0]"


def test_an_unknown_model_is_not_found(live_server):
    response = post(live_server, "/tokenize", prompt=TEXT, model="no-such-model")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_tokenizer_info_describes_the_served_tokenizer(live_server):
    with live_server.http() as http:
        info = http.get("/tokenizer_info").json()
    tokenizer = live_server.engine.tokenizer
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == live_server.engine.max_model_len


@pytest.mark.parametrize("method,path", [("GET", "/tokenizer_info"), ("POST", "/tokenize"), ("POST", "/detokenize")])
def test_tokenizer_endpoints_need_the_api_key(live_server, method, path):
    with live_server.http(auth=False) as http:
        response = http.request(method, path, json={"prompt": "a"} if method == "POST" else None)
    assert response.status_code == 401


def test_lm_evals_remote_tokenizer_works_against_the_server(live_server):
    base_url = f"{live_server.base_url}/v1/completions"
    assert check_remote_tokenizer_support(base_url, auth_token=API_KEY)
    remote = RemoteTokenizer(base_url, auth_token=API_KEY)
    tokens = remote.encode(TEXT)
    assert tokens == live_server.engine.tokenizer.encode(TEXT, add_special_tokens=False)
    assert remote.decode(tokens) == TEXT
    assert remote.eos_token_id == live_server.engine.tokenizer.eos_token_id

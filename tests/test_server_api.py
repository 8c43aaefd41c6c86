"""The OpenAI-compatible API, spoken by the official `openai` client and raw httpx, on a real server."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Iterator

import openai
import pytest
import torch
from server_fixtures import live_server, sse_json  # noqa: F401  (pytest fixture)

from unmask.engine.method_params import METHOD_PARAMS_BY_NAME
from unmask.engine.params import CACHE_POLICIES, METHOD_FIELDS, UNMASK_POLICIES, EngineDefaults, ParamError, SamplingParams
from unmask.engine.policies import CACHE_POLICIES as cache_policies
from unmask.server.protocol import BOUNDS, ChatCompletionRequest, CompletionRequest
from unmask.server.translate import MASK_PLACEHOLDER

PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 plus 30?"}]
SMALL = {"block_length": 8, "steps": 8}


def complete(client, server, **kwargs):
    args = {"model": server.model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "extra_body": SMALL}
    return client.completions.create(**{**args, **kwargs})


def chat(client, server, **kwargs):
    args = {"model": server.model, "messages": CHAT, "max_tokens": 16, "temperature": 0, "extra_body": SMALL}
    return client.chat.completions.create(**{**args, **kwargs})


# --- models and health ---------------------------------------------------------------------------


def test_models_lists_the_served_model_with_its_context(live_server):
    models = live_server.openai().models.list().data
    assert [m.id for m in models] == [live_server.model]
    assert models[0].model_extra["max_model_len"] == live_server.engine.max_model_len


def test_health_is_ok_while_the_engine_runs(live_server):
    with live_server.http(auth=False) as http:
        response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --- completions ---------------------------------------------------------------------------------


def test_completion_has_text_finish_reason_and_usage(live_server):
    result = complete(live_server.openai(), live_server)
    assert result.object == "text_completion" and result.model == live_server.model
    (choice,) = result.choices
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    usage = result.usage
    assert usage.prompt_tokens > 0 and 0 <= usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion_is_deterministic_at_temperature_zero(live_server):
    client = live_server.openai()
    assert complete(client, live_server).choices[0].text == complete(client, live_server).choices[0].text


def test_prompt_may_be_token_ids_or_a_list_of_prompts(live_server):
    client = live_server.openai()
    ids = live_server.engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    by_text = complete(client, live_server).choices[0].text
    assert complete(client, live_server, prompt=ids).choices[0].text == by_text
    many = complete(client, live_server, prompt=[PROMPT, "Hello world"], n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text  # temperature 0: the seed does not matter
    assert many.usage.prompt_tokens == len(ids) + len(
        live_server.engine.tokenizer.encode("Hello world", add_special_tokens=False)
    )


def test_choice_i_samples_with_seed_plus_i(live_server):
    client = live_server.openai()
    sampled = {"temperature": 1.0, "max_tokens": 16}
    both = complete(client, live_server, n=2, seed=7, **sampled)
    alone = complete(client, live_server, seed=8, **sampled)
    assert both.choices[1].text == alone.choices[0].text


def test_echo_prepends_the_prompt(live_server):
    client = live_server.openai()
    plain = complete(client, live_server).choices[0].text
    assert complete(client, live_server, echo=True).choices[0].text == PROMPT + plain


def test_text_ends_before_a_stop_string(live_server):
    client = live_server.openai()
    full = complete(client, live_server, max_tokens=32).choices[0].text
    if len(full.strip()) < 4:
        pytest.skip(f"the model's text is too short to cut: {full!r}")
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    result = complete(client, live_server, max_tokens=32, stop=[stop]).choices[0]
    assert result.text == full[: full.find(stop)]
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("cache", CACHE_POLICIES)
@pytest.mark.parametrize("unmask", UNMASK_POLICIES)
def test_every_policy_combination_is_selectable_per_request(live_server, cache, unmask):
    extra = {**SMALL, "cache": cache, "unmask": unmask, "threshold": 0.5, "factor": 2.0, "seed": 1}
    try:
        result = complete(live_server.openai(), live_server, max_tokens=12, extra_body=extra)
    except openai.BadRequestError as refused:
        # Guided decoding needs a guide model sharing the checkpoint's tokenizer; a random
        # test checkpoint has none, and the engine says so. The block caches need a
        # block-causal model; this one attends bidirectionally.
        if cache_policies[cache].block_causal_only:
            assert refused.body["param"] == "cache", refused.body
        else:
            assert unmask == "guided" and refused.body["param"] == "unmask", refused.body
        return
    assert result.choices[0].finish_reason in ("stop", "length")


def test_every_engine_parameter_is_a_request_field():
    http_fields = set(CompletionRequest.model_fields) & set(ChatCompletionRequest.model_fields)
    missing = {f.name for f in fields(SamplingParams)} - http_fields
    assert missing <= {"max_tokens"}  # chat spells it max_completion_tokens too


def _engine_accepts(name: str, value) -> bool:
    owner = METHOD_FIELDS.get(name)
    params = SamplingParams(**{name: value, **({owner[0]: owner[1][0]} if owner else {})})
    try:
        params.resolve(EngineDefaults())
    except ParamError as exc:
        assert exc.param == name
        return False
    return True


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_schema_ranges_are_the_engine_ranges(name):
    method_param = METHOD_PARAMS_BY_NAME.get(name)
    if method_param is not None:
        integer = method_param.kind is int  # its default may be None (off)
    else:
        integer = name in ("seed", "steps", "top_k") or isinstance(getattr(EngineDefaults(), name, 0.0), int)
    nudge = 1 if integer else 1e-6
    for kind, bound in BOUNDS[name].items():
        bound = int(bound) if integer else float(bound)
        inside = {"ge": bound, "gt": bound + nudge, "le": bound, "lt": bound - nudge}[kind]
        outside = {"ge": bound - nudge, "gt": bound, "le": bound + nudge, "lt": bound}[kind]
        assert _engine_accepts(name, inside), f"{name}={inside} is in the schema's range but the engine refuses it"
        assert not _engine_accepts(name, outside), f"{name}={outside} is outside the schema's range but accepted"


def test_every_method_parameter_has_its_range_in_the_schema():
    assert set(METHOD_FIELDS) <= set(BOUNDS)


def test_method_parameters_reach_the_engine(live_server):
    client = live_server.openai()
    result = complete(client, live_server, extra_body={**SMALL, "cache": "dkv", "dkv_refresh": 2})
    assert result.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as refused:  # the engine checks it belongs to the chosen method
        complete(client, live_server, extra_body={**SMALL, "cache": "none", "dkv_refresh": 2})
    assert refused.value.body["param"] == "dkv_refresh"


def test_schedule_and_block_start_reach_the_engine(live_server):
    client = live_server.openai()
    result = complete(client, live_server, extra_body={**SMALL, "schedule": "dream", "schedule_eps": 0.5})
    assert result.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as refused:  # schedule_eps belongs to schedule=dream
        complete(client, live_server, extra_body={**SMALL, "schedule": "llada", "schedule_eps": 0.5})
    assert refused.value.body["param"] == "schedule_eps"
    with pytest.raises(openai.BadRequestError) as refused:  # the guided policy chooses every commit itself
        complete(client, live_server, extra_body={**SMALL, "unmask": "guided", "block_start": "first"})
    assert refused.value.body["param"] == "block_start"


# --- chat ----------------------------------------------------------------------------------------


def test_chat_completion_answers_as_the_assistant(live_server):
    result = chat(live_server.openai(), live_server)
    assert result.object == "chat.completion"
    (choice,) = result.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens > 0


def test_max_completion_tokens_bounds_the_answer(live_server):
    result = chat(live_server.openai(), live_server, max_tokens=None, max_completion_tokens=4, extra_body={})
    assert result.usage.completion_tokens <= 4


def test_chat_accepts_text_content_parts(live_server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is 12 plus 30?"}]}]
    client = live_server.openai()
    assert (
        chat(client, live_server, messages=parts).choices[0].message.content
        == chat(client, live_server, messages=[{"role": "user", "content": "What is 12 plus 30?"}])
        .choices[0]
        .message.content
    )


# --- ignore_eos ----------------------------------------------------------------------------------


@pytest.fixture
def eos_everywhere(live_server) -> Iterator[None]:
    """Bias the served model's LM head so that every position predicts end-of-text confidently."""
    engine = live_server.engine.engine
    bias = torch.zeros(engine.model_config.vocab_size)
    bias[engine.model_config.eos_token_id] = 50.0
    handle = engine.loaded.model.lm_head.register_forward_hook(lambda m, i, out: out + bias.to(out))
    yield
    handle.remove()


@pytest.mark.parametrize("create", [complete, chat], ids=["completions", "chat"])
def test_ignore_eos_generates_exactly_max_tokens(live_server, eos_everywhere, create):
    client = live_server.openai()
    stopped = create(client, live_server, max_tokens=24)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 0
    result = create(client, live_server, max_tokens=24, extra_body={**SMALL, "ignore_eos": True})
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 24


# --- streaming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [{}, {"cache": "dual", "unmask": "threshold", "threshold": 0.5}])
def test_streamed_completion_concatenates_to_the_plain_text(live_server, policy):
    client = live_server.openai()
    extra = {**SMALL, **policy}
    plain = complete(client, live_server, max_tokens=32, extra_body=extra).choices[0]
    chunks = list(complete(client, live_server, max_tokens=32, extra_body=extra, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_streamed_chat_sends_role_then_content_then_finish_reason(live_server):
    client = live_server.openai()
    plain = chat(client, live_server, max_tokens=32).choices[0]
    chunks = list(chat(client, live_server, max_tokens=32, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.message.content
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_raw_stream_is_framed_exactly_like_openai(live_server):
    body = {"model": live_server.model, "prompt": PROMPT, "max_tokens": 16, "stream": True, **SMALL}
    with live_server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_json(response.text)
    assert events and all(e["object"] == "text_completion" for e in events)
    assert all(set(e["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} for e in events)


def test_include_usage_adds_a_last_chunk_with_usage_and_no_choices(live_server):
    client = live_server.openai()
    chunks = list(complete(client, live_server, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_n_choices_each_concatenate_to_their_text(live_server):
    client = live_server.openai()
    sampled = {"temperature": 1.0, "seed": 3, "n": 2, "max_tokens": 24}
    plain = complete(client, live_server, **sampled)
    texts = ["", ""]
    for chunk in complete(client, live_server, stream=True, **sampled):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in plain.choices]


def test_stream_blocks_show_each_block_unmasking_to_zero_masks(live_server):
    client = live_server.openai()
    extra = {"block_length": 8, "steps": 8, "stream_blocks": True}
    plain = complete(client, live_server, max_tokens=24, extra_body={"block_length": 8, "steps": 8}).choices[0]
    views, text = [], ""
    for chunk in complete(client, live_server, max_tokens=24, stream=True, extra_body=extra):
        choice = chunk.choices[0]
        text += choice.text
        views.append(choice.model_extra["block"])
    assert text == plain.text  # block views never leak into the finalized text
    assert all(v is not None for v in views)
    by_block: dict[int, list[dict]] = {}
    for view in views:
        assert view["text"].count(view["placeholder"]) >= view["num_masked"]
        assert view["placeholder"] == MASK_PLACEHOLDER
        by_block.setdefault(view["index"], []).append(view)
    indices = sorted(by_block)
    assert indices == list(range(len(indices)))
    for index in indices:
        masked = [v["num_masked"] for v in by_block[index]]
        assert masked == sorted(masked, reverse=True), f"masks grew in block {index}: {masked}"
        if index != indices[-1]:
            assert masked[-1] == 0, f"block {index} ended with masks left"
    assert by_block[0][0]["num_masked"] > 0  # the stream starts before the first block is done


def test_stream_blocks_reach_chat_chunks_too(live_server):
    extra = {"block_length": 8, "steps": 8, "stream_blocks": True}
    chunks = list(chat(live_server.openai(), live_server, stream=True, extra_body=extra))
    blocks = [c.choices[0].model_extra.get("block") for c in chunks[1:]]
    assert blocks and all(b is not None for b in blocks)
    assert chunks[0].choices[0].model_extra.get("block") is None  # the role chunk carries no block


def test_stream_without_stream_blocks_has_no_block_field(live_server):
    body = {"model": live_server.model, "messages": CHAT, "max_tokens": 16, "stream": True, **SMALL}
    with live_server.http() as http:
        events = sse_json(http.post("/v1/chat/completions", json=body).text)
    assert all("block" not in e["choices"][0] for e in events)
    assert json.dumps(events[0]["choices"][0]["delta"]) == json.dumps({"role": "assistant", "content": ""})

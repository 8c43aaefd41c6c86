"""`unmask serve` on a block-causal checkpoint: the OpenAI API as for any other model, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from test_server_cli import serving

from unmask.engine.llm import LLM
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.engine.params import SamplingParams


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sdar-serve"), arch="sdar", layers=2, hidden=64, heads=4, layer_std=0.2)


@pytest.fixture(scope="module")
def sdar_url(sdar_dir) -> Iterator[str]:
    with serving(str(sdar_dir), "--kv-cache-memory", "64MiB") as url:
        yield url


def test_sdar_answers_completions_in_its_blocks(sdar_url):
    body = {"prompt": "What is 12 plus 30?", "max_tokens": 10, "ignore_eos": True}
    reply = httpx.post(f"{sdar_url}/v1/completions", json=body, timeout=120).json()
    assert reply["usage"]["completion_tokens"] == 10 and reply["choices"][0]["finish_reason"] == "length"


def test_sdar_answers_chat_completions(sdar_url):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "unmask": "threshold", "ignore_eos": True}
    reply = httpx.post(f"{sdar_url}/v1/chat/completions", json=body, timeout=120).json()
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] == 8


def test_sdar_streams_partially_unmasked_blocks(sdar_url):
    body = {"prompt": "Hello", "max_tokens": 8, "stream": True, "stream_blocks": True, "ignore_eos": True}
    with httpx.stream("POST", f"{sdar_url}/v1/completions", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    blocks = [e["choices"][0]["block"] for e in events if e["choices"][0].get("block")]
    masked = [b["num_masked"] for b in blocks]
    # One token per step in SDAR's blocks of 4 (not the server's default 32): at most 3 still masked.
    assert max(masked) == 3 and 0 in masked
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_a_full_attention_cache_is_a_400_naming_the_field(sdar_url):
    reply = httpx.post(f"{sdar_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "cache": "dual"}, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "cache" and "block-causal" in error["message"]


def test_a_suffix_is_a_400_naming_the_field(sdar_url):
    body = {"prompt": "Hi", "suffix": " there.", "max_tokens": 4}
    reply = httpx.post(f"{sdar_url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "suffix" and "block-causal" in error["message"]


def test_sdar_echo_logprobs_score_the_prompt_in_its_blocks_and_the_tokens_at_commit(sdar_url, sdar_dir):
    prompt = [10, 40, 41, 42, 43, 44, 45, 46, 47]  # blocks of 4: scores read with block-causal attention
    body = {"prompt": prompt, "max_tokens": 6, "echo": True, "logprobs": 1, "ignore_eos": True}
    reply = httpx.post(f"{sdar_url}/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    offline = LLM(str(sdar_dir))
    scored = offline.score(prompt, top_logprobs=1)[0]
    generated = offline.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=1))[0]
    expected = [None] + [e.logprob for e in scored.logprobs[1:]] + [e.logprob for e in generated.logprobs]
    assert reply.json()["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)

"""`unmask serve` on mixture-of-experts checkpoints: a random LLaDA2 one, and dummy LLaDA-MoE / LLaDA2.0-mini
directories (their presets scaled down to run on a CPU) answering the OpenAI API."""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest
from test_server_cli import serving

from unmask.engine.models.make_random import main as make_random
from unmask.engine.models.make_random import make_random_checkpoint

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def llada2_url(tmp_path_factory) -> Iterator[str]:
    model_dir = make_random_checkpoint(tmp_path_factory.mktemp("llada2-serve"), arch="llada2", layers=2, hidden=64,
                                       heads=4, layer_std=0.2)
    with serving(str(model_dir), "--kv-cache-memory", "64MiB") as url:
        yield url


def test_a_random_llada2_checkpoint_answers_chat_completions(llada2_url):
    reply = httpx.post(f"{llada2_url}/v1/chat/completions", json=CHAT, timeout=120).json()
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] == 8


def test_llada2_refuses_a_block_length_other_than_its_trained_32_naming_the_field(llada2_url):
    reply = httpx.post(f"{llada2_url}/v1/chat/completions", json=CHAT | {"block_length": 8}, timeout=120)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "block_length"


@pytest.mark.parametrize("preset", ["llada-moe-7b", "llada2-mini"])
def test_a_dummy_moe_preset_directory_answers_completions_and_chat(tmp_path, preset):
    make_random([str(tmp_path), "--preset", preset, "--config-only", "--layers", "2", "--hidden", "128", "--heads", "4"])
    with serving(str(tmp_path), "--load-format", "dummy", "--kv-cache-memory", "64MiB") as url:
        completion = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 6, "ignore_eos": True},
                                timeout=120).json()
        chat = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=120).json()
        assert completion["usage"]["completion_tokens"] == 6 and chat["usage"]["completion_tokens"] == 8

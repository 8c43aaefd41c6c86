"""Prompt scoring: log p(x_i | x_<i, later positions masked), checked against a direct computation."""

from __future__ import annotations

import asyncio

import pytest

from dense_reference import masked_suffix_logprobs
from unmask.engine.async_engine import AsyncEngine
from unmask.engine.config import EngineConfig
from unmask.engine.llm import LLM
from unmask.engine.params import ParamError

PROMPT = [5, 9, 12, 7, 30, 2, 41, 8, 17]


def test_scores_are_the_masked_suffix_conditionals(model_dir):
    scored = LLM(str(model_dir)).score(PROMPT, top_logprobs=3)[0]
    assert scored.token_ids == PROMPT
    assert scored.logprobs[0] is None  # the first token has no prefix
    for entry, token, (logprob, top_ids) in zip(scored.logprobs[1:], PROMPT[1:], masked_suffix_logprobs(model_dir, PROMPT, top=3)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t for t, _ in entry.top] == top_ids


def test_a_small_token_budget_scores_in_more_chunks_with_the_same_result(llada_dir):
    whole = LLM(str(llada_dir)).score(PROMPT, top_logprobs=2)[0]
    chunked = LLM(str(llada_dir), max_num_batched_tokens=len(PROMPT)).score(PROMPT, top_logprobs=2)[0]  # one row a pass
    assert [e.logprob for e in chunked.logprobs[1:]] == pytest.approx([e.logprob for e in whole.logprobs[1:]], abs=1e-5)


def test_a_prompt_over_the_scoring_cap_is_refused(llada_dir):
    llm = LLM(str(llada_dir), max_score_tokens=8)
    assert len(llm.score(PROMPT[:8])[0].logprobs) == 8
    with pytest.raises(ParamError) as refused:
        llm.score(PROMPT)
    assert refused.value.param == "prompt" and "at most 8 tokens" in refused.value.message


def test_a_one_token_prompt_has_only_the_null_score(llada_dir):
    assert LLM(str(llada_dir)).score([5])[0].logprobs == [None]


def test_cancelling_a_score_stops_its_work_on_the_engine(llada_dir):
    async def scenario():
        # A budget of one position per chunk: the long prompt takes hundreds of chunks.
        engine = AsyncEngine(EngineConfig(model_dir=str(llada_dir), max_num_batched_tokens=1, kv_cache_memory=2**22))
        await engine.start()
        try:
            task = asyncio.ensure_future(engine.score("long", list(range(5, 400)), 0))
            while not engine._scoring:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(500):
                if not engine._scoring:
                    break
                await asyncio.sleep(0.01)
            assert not engine._scoring
            short = await engine.score("short", PROMPT, 1)  # the engine goes on serving
            assert len(short.logprobs) == len(PROMPT)
        finally:
            await engine.shutdown()

    asyncio.run(scenario())


@pytest.mark.gpu
def test_scores_on_the_gpu_agree_with_the_cpu(llada_dir):
    cpu = LLM(str(llada_dir), device="cpu").score(PROMPT, top_logprobs=2)[0]
    gpu = LLM(str(llada_dir), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20).score(PROMPT, top_logprobs=2)[0]
    assert [e.logprob for e in gpu.logprobs[1:]] == pytest.approx([e.logprob for e in cpu.logprobs[1:]], abs=1e-3)
    bf16 = LLM(str(llada_dir), device="cuda", kv_cache_memory=64 * 2**20).score(PROMPT)[0]  # the serving dtype
    assert [e.logprob for e in bf16.logprobs[1:]] == pytest.approx([e.logprob for e in cpu.logprobs[1:]], abs=0.1)

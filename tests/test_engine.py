"""Engine behaviour: determinism, batching, finishing, pages, stop strings, bad parameters."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from unmask.engine.engine import LLMEngine
from unmask.engine.llm import LLM
from unmask.engine.outputs import FinishReason
from unmask.engine.params import ParamError, SamplingParams
from unmask.engine.runner import limit_host_threads

PROMPT = "What is 12 plus 30?"


@pytest.fixture
def llm(llada_dir) -> LLM:
    return LLM(str(llada_dir), kv_cache_memory=4 * 2**20)


def run_to_end(engine: LLMEngine) -> dict:
    final = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_temperature_zero_is_deterministic(llm):
    p = SamplingParams(max_tokens=32, block_length=16)
    assert llm.generate(PROMPT, p)[0].token_ids == llm.generate(PROMPT, p)[0].token_ids


def test_same_seed_same_sample_at_positive_temperature(llm):
    p = SamplingParams(max_tokens=32, block_length=16, temperature=0.8, top_p=0.9, seed=7)
    first, second = llm.generate(PROMPT, p)[0], llm.generate(PROMPT, p)[0]
    assert first.token_ids == second.token_ids
    other = llm.generate(PROMPT, SamplingParams(max_tokens=32, block_length=16, temperature=0.8, top_p=0.9, seed=8))[0]
    assert other.token_ids != first.token_ids


@pytest.mark.parametrize("cache,unmask", [("none", "low_confidence"), ("dual", "threshold"), ("prefix", "random")])
def test_output_is_the_same_alone_or_batched_with_other_requests(model_dir, cache, unmask):
    llm = LLM(str(model_dir), kv_cache_memory=4 * 2**20)
    target = SamplingParams(max_tokens=40, block_length=16, steps=8, cache=cache, unmask=unmask, seed=11, temperature=0.5)
    alone = llm.generate(PROMPT, target)[0]
    others = [
        ("Hello world, how are you today?", SamplingParams(max_tokens=24, block_length=8, cache="dual", unmask="factor")),
        ("Sort: apple, banana", SamplingParams(max_tokens=56, block_length=32, cache="prefix", temperature=1.0, seed=3)),
        ("The quick brown fox", SamplingParams(max_tokens=17, block_length=16, unmask="threshold", threshold=0.5)),
    ]
    outs = llm.generate([PROMPT] + [p for p, _ in others], [target] + [s for _, s in others])
    assert outs[0].token_ids == alone.token_ids
    assert outs[0].stats.forward_passes == alone.stats.forward_passes


def test_every_page_is_free_after_requests_finish(llm):
    pool = llm.engine.pool
    llm.generate([PROMPT, "Hello"], [SamplingParams(max_tokens=32), SamplingParams(max_tokens=48, cache="dual")])
    assert pool.num_free == pool.num_pages


def test_abort_mid_block_frees_pages_and_reports_abort(llm):
    engine, pool = llm.engine, llm.engine.pool
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=64, block_length=32))
    engine.add_request("b", PROMPT, SamplingParams(max_tokens=32, block_length=32))
    engine.step()
    engine.step()
    assert pool.num_free < pool.num_pages
    out = engine.abort("a")
    assert out.finished and out.finish_reason is FinishReason.ABORT
    final = run_to_end(engine)
    assert final["b"].finish_reason is FinishReason.LENGTH
    assert pool.num_free == pool.num_pages
    assert engine.abort("a") is None


def test_a_failing_request_fails_alone_and_frees_its_pages(llm):
    engine, pool = llm.engine, llm.engine.pool
    expected = llm.generate(PROMPT, SamplingParams(max_tokens=32, seed=1))[0].token_ids
    engine.add_request("ok", PROMPT, SamplingParams(max_tokens=32, seed=1))
    bad = engine.add_request("bad", PROMPT, SamplingParams(max_tokens=32))
    # A token id past the embedding table makes this sequence's forward raise inside the engine.
    bad.tokens[0] = engine.model_config.vocab_size + 5
    final = run_to_end(engine)
    assert final["bad"].finish_reason is FinishReason.ERROR and "Index" in final["bad"].error
    assert final["ok"].finish_reason is FinishReason.LENGTH
    assert final["ok"].token_ids == expected
    assert pool.num_free == pool.num_pages


@pytest.fixture
def eos_everywhere(llm) -> Iterator[int]:
    """Bias the LM head towards end-of-text, so that every position predicts it confidently; yields its id."""
    eos = llm.engine.model_config.eos_token_id
    bias = torch.zeros(llm.engine.model_config.vocab_size)
    bias[eos] = 50.0
    handle = llm.engine.loaded.model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    yield eos
    handle.remove()


def test_end_of_text_in_a_finished_block_stops_the_request_early(llm, eos_everywhere):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=96, block_length=16))[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == "" and out.token_ids == []
    # End-of-text at the start of the canvas ends the request inside its first block, not after 96 steps.
    assert out.stats.forward_passes <= 16
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


def test_ignore_eos_generates_the_whole_canvas(llm, eos_everywhere):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=40, block_length=16, ignore_eos=True))[0]
    assert out.finish_reason is FinishReason.LENGTH
    assert out.token_ids == [eos_everywhere] * 40
    assert out.text == ""  # end-of-text is a special token: counted, never shown


def test_stop_string_cuts_the_text_and_finishes(llm):
    p = SamplingParams(max_tokens=64, block_length=16, seed=5)
    full = llm.generate(PROMPT, p)[0]
    assert len(full.text) > 12
    stop = full.text[8:11]
    cut = full.text.find(stop)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=64, block_length=16, seed=5, stop=[stop]))[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == full.text[:cut]
    assert out.stats.forward_passes <= full.stats.forward_passes


def test_canvas_not_a_multiple_of_the_block_length(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=37, block_length=16, steps=4))[0]
    assert out.finish_reason is FinishReason.LENGTH
    assert out.stats.steps_per_block == [4, 4, 2]  # the 5-token tail keeps 4 tokens per step
    assert out.stats.tokens_committed == 37


def test_threshold_and_factor_commit_several_tokens_per_step(llm):
    fixed = llm.generate(PROMPT, SamplingParams(max_tokens=32, block_length=32))[0]
    for unmask in ("threshold", "factor"):
        out = llm.generate(PROMPT, SamplingParams(max_tokens=32, block_length=32, unmask=unmask, threshold=0.05, factor=4.0))[0]
        assert out.stats.forward_passes < fixed.stats.forward_passes, unmask
        assert out.stats.tokens_per_step > 1.0, unmask


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_length", 0),
        ("block_length", -4),
        ("steps", 0),
        ("steps", 33),
        ("threshold", 0.0),
        ("threshold", 1.5),
        ("factor", -1.0),
        ("cache", "turbo"),
        ("unmask", "all_at_once"),
        ("confidence", "vibes"),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("max_tokens", 0),
        ("temperature", float("nan")),
        ("ignore_eos", 1),
    ],
)
def test_bad_parameters_raise_an_error_naming_the_field(llm, field, value):
    params = SamplingParams(max_tokens=32, block_length=32)
    setattr(params, field, value)
    with pytest.raises(ParamError) as info:
        llm.generate(PROMPT, params)
    assert info.value.param == field
    assert field in str(info.value)
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages and not llm.engine.has_unfinished


@pytest.mark.parametrize(
    ("params", "field", "flag"),
    [(SamplingParams(cache="dllm-cache"), "cache", "--feature-cache"), (SamplingParams(unmask="guided"), "unmask", "--guide-model")],
)
def test_a_method_the_engine_was_started_without_is_refused_naming_how_to_start_it(llm, params, field, flag):
    # llada_dir's random checkpoint has its own tokenizer, so the bundled guide does not fit it
    with pytest.raises(ParamError) as info:
        llm.generate(PROMPT, params)
    assert info.value.param == field and flag in str(info.value)
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages and not llm.engine.has_unfinished


def test_prompt_plus_canvas_beyond_the_context_is_refused(llm):
    with pytest.raises(ParamError) as info:
        llm.generate(PROMPT, SamplingParams(max_tokens=llm.engine.max_model_len))
    assert info.value.param == "max_tokens"


@pytest.mark.parametrize("prompt", [[], [10**9], [-1]])
def test_bad_prompt_token_ids_are_refused(llm, prompt):
    with pytest.raises(ParamError) as info:
        llm.generate([prompt], SamplingParams(max_tokens=8))
    assert info.value.param == "prompt"


def test_step_statistics_reach_listeners(llm):
    seen = []
    llm.engine.step_listeners.append(seen.append)
    llm.generate([PROMPT, "Hello"], SamplingParams(max_tokens=16, block_length=16, cache="dual"))
    assert seen and max(s.batch_size for s in seen) == 2
    assert sum(s.tokens_committed for s in seen) == 32
    assert any(s.finished_blocks for s in seen)
    # dual recomputes one block after the refresh: fewer active positions than the full sequences
    assert min(s.active_tokens for s in seen) == 32


def test_offline_generate_takes_more_prompts_than_the_waiting_queue_holds(llada_dir):
    llm = LLM(str(llada_dir), kv_cache_memory=4 * 2**20, max_num_seqs=2, max_waiting=2)
    prompts = [f"{PROMPT} ({i})" for i in range(7)]
    params = SamplingParams(max_tokens=16, block_length=8)
    outs = llm.generate(prompts, params)
    assert [o.prompt_token_ids for o in outs] == [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    assert all(o.finished and o.finish_reason is not FinishReason.ERROR for o in outs)
    assert outs[5].token_ids == llm.generate(prompts[5], params)[0].token_ids  # admitted late, decoded the same


def test_a_bad_prompt_met_late_aborts_the_others_and_frees_their_pages(llada_dir):
    llm = LLM(str(llada_dir), kv_cache_memory=4 * 2**20, max_num_seqs=2, max_waiting=2)
    too_long = [5] * (llm.engine.max_model_len + 1)
    with pytest.raises(ParamError):
        llm.generate([PROMPT, PROMPT, PROMPT, too_long], SamplingParams(max_tokens=16, block_length=8))
    assert not llm.engine.has_unfinished
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


def test_host_ops_run_on_one_thread_when_the_model_is_on_a_gpu_and_on_all_on_the_cpu():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        limit_host_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 2  # the CPU model's matrix products need them
        limit_host_threads(torch.device("cuda", 0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

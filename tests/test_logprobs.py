"""Commit-time logprobs and the top-k / min-p sampling filters, in the engine."""

from __future__ import annotations

import math

import pytest
import torch

from dense_reference import dense_logits
from unmask.engine.llm import LLM
from unmask.engine.models import load_model
from unmask.engine.params import ParamError, SamplingParams
from unmask.engine.sampling import min_p_filter, top_k_filter


@torch.no_grad()
def commit_time_reference(model, cfg, prompt: list[int], gen_length: int, top: int) -> list[tuple[int, float, list[int]]]:
    """Greedy one-token-per-step decoding in one block on full sequences (no pages, no cache), recording at
    each commit the token, its log-softmax (mask token excluded) and the `top` likeliest ids at that step."""
    x = torch.tensor(prompt + [cfg.mask_token_id] * gen_length)
    records = {}
    for _ in range(gen_length):
        logits = dense_logits(model, cfg, x)
        logp = logits.log_softmax(-1)
        best = logp.max(-1)
        masked = x == cfg.mask_token_id
        confidence = torch.where(masked, best.values, torch.tensor(float("-inf")))
        position = int(confidence.argmax())
        token = int(best.indices[position])
        x[position] = token
        records[position] = (token, float(logp[position, token]), logp[position].topk(top).indices.tolist())
    return [records[p] for p in sorted(records)]


def test_each_token_has_its_log_probability_at_the_step_that_committed_it(model_dir):
    loaded = load_model(model_dir)
    prompt = [5, 9, 12, 7]
    expected = commit_time_reference(loaded.model, loaded.config, prompt, gen_length=8, top=3)
    # LLaDA's even schedule: one commit per step, as the reference (Dream's own schedule commits none at first).
    params = SamplingParams(max_tokens=8, block_length=8, logprobs=3, ignore_eos=True, schedule="llada")
    out = LLM(str(model_dir)).generate(prompt, params)[0]
    assert [e.token_id for e in out.logprobs] == out.token_ids == [t for t, _, _ in expected]
    for entry, (token, logprob, top_ids) in zip(out.logprobs, expected):
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t for t, _ in entry.top] == top_ids


def test_top_alternatives_are_sorted_and_include_the_greedy_token(llada_dir):
    out = LLM(str(llada_dir)).generate([5, 9, 12], SamplingParams(max_tokens=6, logprobs=4, ignore_eos=True))[0]
    for entry in out.logprobs:
        values = [lp for _, lp in entry.top]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob))  # greedy: the token is the top one


def test_a_request_without_logprobs_gets_none(llada_dir):
    out = LLM(str(llada_dir)).generate([5, 9, 12], SamplingParams(max_tokens=4))[0]
    assert out.logprobs is None


def test_the_end_of_text_token_that_ended_the_request_has_its_logprob(bundled_model_dir):
    llm = LLM(str(bundled_model_dir))
    message = [{"role": "user", "content": "Sort these numbers from smallest to largest: 42, 7, 19"}]
    out = llm.chat(message, SamplingParams(max_tokens=32, logprobs=0))
    assert out.text == "Answer: 7, 19, 42"
    assert len(out.logprobs) == len(out.token_ids) + 1
    assert out.logprobs[-1].token_id == llm.engine.model_config.eos_token_id
    assert all(e.top == [] for e in out.logprobs)


def test_logprobs_are_refused_with_guided_unmasking(bundled_model_dir):
    llm = LLM(str(bundled_model_dir))
    with pytest.raises(ParamError) as refused:
        llm.generate("Hello", SamplingParams(max_tokens=4, unmask="guided", logprobs=1))
    assert refused.value.param == "logprobs"


@pytest.mark.parametrize("field,value", [("logprobs", 21), ("logprobs", -1), ("top_k", -2), ("min_p", 1.5), ("min_p", -0.1)])
def test_out_of_range_sampling_fields_are_refused(llada_dir, field, value):
    with pytest.raises(ParamError) as refused:
        LLM(str(llada_dir)).generate([5, 9], SamplingParams(max_tokens=2, **{field: value}))
    assert refused.value.param == field


def test_top_k_filter_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 5.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, False, True]]


def test_min_p_filter_drops_tokens_below_min_p_times_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(min_p_filter(probs.log(), 0.25))  # threshold 0.125
    assert kept.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("field,value", [("top_k", 1), ("min_p", 1.0)])
def test_a_filter_that_keeps_one_token_makes_sampling_greedy(llada_dir, field, value):
    llm = LLM(str(llada_dir))
    prompt = [5, 9, 12, 7]
    greedy = llm.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    hot = SamplingParams(max_tokens=16, ignore_eos=True, temperature=5.0, seed=3)
    unfiltered = llm.generate(prompt, hot)[0].token_ids
    filtered = llm.generate(prompt, SamplingParams(**{**vars(hot), field: value}))[0].token_ids
    assert unfiltered != greedy  # the temperature really samples ...
    assert filtered == greedy  # ... and the filter leaves only the top token to sample


def test_top_k_samples_only_among_the_k_likeliest(llada_dir):
    """Every token sampled with top_k=3 is among the 3 likeliest at the step that committed it."""
    llm = LLM(str(llada_dir))
    params = SamplingParams(max_tokens=16, ignore_eos=True, temperature=50.0, seed=1, top_k=3, logprobs=3)
    out = llm.generate([5, 9, 12, 7], params)[0]
    assert all(e.token_id in [t for t, _ in e.top] for e in out.logprobs)
    assert any(e.token_id != e.top[0][0] for e in out.logprobs)  # not simply greedy
    assert all(math.isfinite(e.logprob) for e in out.logprobs)


@pytest.mark.gpu
def test_commit_time_logprobs_on_the_gpu_agree_with_the_cpu(llada_dir):
    params = SamplingParams(max_tokens=16, block_length=8, logprobs=2, ignore_eos=True, top_k=5)
    cpu = LLM(str(llada_dir), device="cpu").generate([5, 9, 12, 7], params)[0]
    gpu = LLM(str(llada_dir), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20).generate([5, 9, 12, 7], params)[0]
    assert gpu.token_ids == cpu.token_ids
    assert [e.logprob for e in gpu.logprobs] == pytest.approx([e.logprob for e in cpu.logprobs], abs=1e-3)

"""Dream decodes as Dream's own reference does: its timestep schedule, its algs, alg_temp, and Fast-dLLM's block start.

Every comparison runs the engine against `decoding_reference.dense_decode` on random
checkpoints made contextual, at temperature 0, token for token.
"""

from __future__ import annotations

import json

import pytest
import torch

from decoding_reference import commit_order, contextual_checkpoint, dense_decode, distinct_predictions
from unmask.engine.llm import LLM
from unmask.engine.models import load_model
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams
from unmask.engine.policies.dream_schedule import dream_transfer_count
from unmask.engine.policies.unmask import Threshold
from unmask.engine.sequence import Sequence

PROMPT = "What is 12 plus 30?"


@pytest.fixture(scope="module")
def dream_llm(tmp_path_factory) -> LLM:
    return LLM(str(contextual_checkpoint(tmp_path_factory.mktemp("dream-ctx"), "dream")))


@pytest.fixture(scope="module")
def llada_llm(tmp_path_factory) -> LLM:
    return LLM(str(contextual_checkpoint(tmp_path_factory.mktemp("llada-ctx"), "llada")))


def prompt_ids(llm: LLM) -> list[int]:
    return llm.tokenizer.encode(PROMPT, add_special_tokens=False)


def mask_canvas(llm: LLM, n: int) -> list[int]:
    return [llm.engine.model_config.mask_token_id] * n


def commits_per_step(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    counts: list[int] = []
    llm.engine.step_listeners.append(lambda stats: counts.append(stats.tokens_committed))
    try:
        llm.generate(prompt, params)
    finally:
        llm.engine.step_listeners.pop()
    return counts


def test_the_contextual_checkpoints_predict_by_context(dream_llm, llada_llm):
    for llm in (dream_llm, llada_llm):
        assert distinct_predictions(llm.engine.loaded, prompt_ids(llm), 32) >= 8


def test_dream_schedule_commits_nothing_first_and_one_extra_last():
    counts = [dream_transfer_count(64 - done, i, 64, 1e-3) for i, done in enumerate([0] + list(range(63)))]
    assert counts == [0] + [1] * 62 + [2]


def test_a_dream_checkpoint_defaults_to_dreams_schedule(dream_llm):
    params = SamplingParams(max_tokens=64, block_length=64, ignore_eos=True)
    assert commits_per_step(dream_llm, prompt_ids(dream_llm), params) == [0] + [1] * 62 + [2]


def test_llada_schedule_stays_selectable_on_dream(dream_llm):
    params = SamplingParams(max_tokens=16, block_length=16, steps=16, schedule="llada", ignore_eos=True)
    assert commits_per_step(dream_llm, prompt_ids(dream_llm), params) == [1] * 16


def test_a_llada_checkpoint_keeps_llada_schedule(llada_llm):
    params = SamplingParams(max_tokens=16, block_length=16, ignore_eos=True)
    assert commits_per_step(llada_llm, prompt_ids(llada_llm), params) == [1] * 16


@pytest.mark.parametrize("confidence", ["prob", "margin", "entropy"])  # Dream's maskgit_plus, topk_margin, entropy
@pytest.mark.parametrize("gen_length,block_length,steps", [(32, 32, 32), (32, 32, 12), (32, 16, 8)])
def test_dream_decoding_equals_dreams_schedule(dream_llm, confidence, gen_length, block_length, steps):
    prompt = prompt_ids(dream_llm)
    expected = dense_decode(
        dream_llm.engine.loaded, prompt, mask_canvas(dream_llm, gen_length),
        block_length=block_length, steps=steps, schedule="dream", confidence=confidence,
    )
    params = SamplingParams(
        max_tokens=gen_length, block_length=block_length, steps=steps, confidence=confidence, ignore_eos=True
    )
    out = dream_llm.generate(prompt, params)[0]
    assert out.token_ids == expected.canvas
    assert out.stats.forward_passes == expected.passes


def test_schedule_eps_is_dreams_eps(dream_llm):
    prompt = prompt_ids(dream_llm)
    expected = dense_decode(
        dream_llm.engine.loaded, prompt, mask_canvas(dream_llm, 32), block_length=32, steps=8, schedule="dream", eps=0.3
    )
    params = SamplingParams(max_tokens=32, block_length=32, steps=8, schedule_eps=0.3, ignore_eos=True)
    assert commits_per_step(dream_llm, prompt, params) == expected.commits
    assert dream_llm.generate(prompt, params)[0].token_ids == expected.canvas


def test_threshold_with_the_block_start_rule_equals_fast_dllm(dream_llm):
    prompt = prompt_ids(dream_llm)
    expected = dense_decode(
        dream_llm.engine.loaded, prompt, mask_canvas(dream_llm, 32), block_length=16, threshold=0.5, first_rule=True
    )
    params = SamplingParams(
        max_tokens=32, block_length=16, unmask="threshold", threshold=0.5, block_start="first", ignore_eos=True
    )
    out = dream_llm.generate(prompt, params)[0]
    assert out.token_ids == expected.canvas
    assert out.stats.forward_passes == expected.passes


@pytest.mark.parametrize("cache,rule", [("dual", "first"), ("prefix", "first"), ("none", "confidence")])
def test_dream_under_fast_dllm_caches_with_threshold_defaults_to_the_block_start_rule(dream_llm, cache, rule):
    seq = dream_llm.engine.make_sequence("r", prompt_ids(dream_llm), SamplingParams(cache=cache, unmask="threshold"))
    assert seq.params.block_start == rule


def test_the_block_start_rule_is_refused_with_an_unmask_policy_that_chooses_every_commit(dream_llm):
    params = SamplingParams(unmask="guided", block_start="first")
    with pytest.raises(ParamError) as refused:
        dream_llm.engine.make_sequence("r", prompt_ids(dream_llm), params)
    assert refused.value.param == "block_start" and "guided" in refused.value.message


def test_llada_never_defaults_to_the_block_start_rule(llada_llm):
    seq = llada_llm.engine.make_sequence("r", prompt_ids(llada_llm), SamplingParams(cache="dual", unmask="threshold"))
    assert seq.params.block_start == "confidence"


def test_dual_cache_with_threshold_commits_each_block_start_at_its_first_step(dream_llm):
    params = SamplingParams(max_tokens=32, block_length=16, cache="dual", unmask="threshold", ignore_eos=True)
    counts = commits_per_step(dream_llm, prompt_ids(dream_llm), params)
    out = dream_llm.generate(prompt_ids(dream_llm), params)[0]
    assert counts[0] == 1 and counts[out.stats.steps_per_block[0]] == 1
    assert len(counts) == sum(out.stats.steps_per_block)


def test_threshold_commits_a_confidence_equal_to_tau(dream_llm):
    seq = Sequence("r", [5], SamplingParams(max_tokens=4, threshold=0.5).resolve(EngineDefaults()), 1, 0, seed=0)
    chosen = Threshold().choose(seq, torch.tensor([0.25, 0.5, 0.75, 0.125]))
    assert sorted(chosen.tolist()) == [1, 2]


def test_a_tiny_alg_temp_follows_the_confidence_order(dream_llm):
    prompt = prompt_ids(dream_llm)
    greedy = SamplingParams(max_tokens=32, block_length=32, ignore_eos=True)
    tiny = SamplingParams(max_tokens=32, block_length=32, alg_temp=1e-6, seed=3, ignore_eos=True)
    assert dream_llm.generate(prompt, tiny)[0].token_ids == dream_llm.generate(prompt, greedy)[0].token_ids


def test_alg_temp_samples_the_order_from_the_requests_seed(dream_llm):
    prompt = prompt_ids(dream_llm)

    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=32, block_length=32, alg_temp=5.0, seed=seed, ignore_eos=True)
        return dream_llm.generate(prompt, params)[0].token_ids

    assert run(1) == run(1)
    assert len({tuple(run(seed)) for seed in range(4)}) > 1


def test_generation_config_sets_dreams_alg_alg_temp_and_eps(tmp_path):
    path = contextual_checkpoint(tmp_path / "dream", "dream")
    (path / "generation_config.json").write_text(json.dumps({"alg": "entropy", "alg_temp": 0.0, "eps": 0.2}))
    llm = LLM(str(path))
    assert (llm.engine.defaults.confidence, llm.engine.defaults.schedule_eps) == ("entropy", 0.2)
    prompt = prompt_ids(llm)
    expected = dense_decode(
        llm.engine.loaded, prompt, mask_canvas(llm, 32), block_length=32, steps=8,
        schedule="dream", confidence="entropy", eps=0.2,
    )
    out = llm.generate(prompt, SamplingParams(max_tokens=32, block_length=32, steps=8, ignore_eos=True))[0]
    assert out.token_ids == expected.canvas


def test_an_explicit_server_default_wins_over_generation_config(tmp_path):
    path = contextual_checkpoint(tmp_path / "dream", "dream")
    (path / "generation_config.json").write_text(json.dumps({"alg": "entropy"}))
    llm = LLM(str(path), defaults=EngineDefaults(confidence="margin"))
    assert llm.engine.defaults.confidence == "margin"


@pytest.mark.parametrize("arch,schedule", [("dream", "dream"), ("dream", "llada"), ("llada", "llada")])
def test_commit_order_equals_the_references_step_by_step(dream_llm, llada_llm, arch, schedule):
    llm = dream_llm if arch == "dream" else llada_llm
    prompt = prompt_ids(llm)
    expected = dense_decode(
        llm.engine.loaded, prompt, mask_canvas(llm, 32), block_length=16, steps=16, schedule=schedule
    )
    params = SamplingParams(max_tokens=32, block_length=16, steps=16, schedule=schedule, ignore_eos=True)
    assert commit_order(llm, prompt, params) == expected.order


@pytest.mark.gpu
def test_cuda_dream_decoding_equals_dreams_schedule(tmp_path):
    path = contextual_checkpoint(tmp_path / "dream", "dream")
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20)
    reference = load_model(path, dtype="float32", device="cpu")
    prompt = prompt_ids(llm)
    expected = dense_decode(reference, prompt, mask_canvas(llm, 32), block_length=16, steps=8, schedule="dream")
    out = llm.generate(prompt, SamplingParams(max_tokens=32, block_length=16, steps=8, ignore_eos=True))[0]
    assert out.token_ids == expected.canvas

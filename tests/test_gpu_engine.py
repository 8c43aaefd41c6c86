"""The engine on a CUDA device: Triton kernels, CUDA graphs, bf16 (skipped without CUDA)."""

from __future__ import annotations

import warnings

import pytest
import torch

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.llm import LLM
from unmask.engine.params import SamplingParams
from unmask.engine.runner import SequenceWork

pytestmark = pytest.mark.gpu

PROMPTS = ["What is 12 plus 30?", "Hello world, how are you", "Sort: apple, banana, cherry, date"]


def _engine(model_dir, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model_dir), device="cuda", kv_cache_memory=64 * 2**20, **config))


def _first_step_work(engine: LLMEngine) -> list[SequenceWork]:
    """A full-sequence step for three scheduled requests of different lengths."""
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24 + 8 * i, block_length=8)) for i, p in enumerate(PROMPTS)]
    engine.scheduler.admit()
    return [SequenceWork(s, torch.arange(s.length), s.masked_in_block()) for s in seqs]


def test_graph_replay_matches_the_eager_forward(llada_dir):
    engine = _engine(llada_dir)
    assert engine.runner.graphs is not None
    work = _first_step_work(engine)
    graphed = engine.runner.run(work).float()
    assert engine.runner.graphs.num_graphs == 1
    engine.runner.graphs = None
    eager = engine.runner.run(work).float()
    torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2)


def test_released_graphs_are_captured_again_on_the_next_step(llada_dir):
    engine = _engine(llada_dir)
    work = _first_step_work(engine)
    first = engine.runner.run(work).float()
    engine.runner.graphs.release()  # what a tensor-parallel rank does before leaving its NCCL group
    assert engine.runner.graphs.num_graphs == 0
    again = engine.runner.run(work).float()
    assert engine.runner.graphs.num_graphs == 1
    torch.testing.assert_close(again, first)


def test_cuda_generation_is_the_same_alone_or_batched(llada_dir):
    llm = LLM(str(llada_dir), device="cuda", kv_cache_memory=64 * 2**20)
    params = SamplingParams(max_tokens=32, block_length=16, cache="dual", seed=4)
    alone = llm.generate(PROMPTS[0], params)[0]
    batched = llm.generate(PROMPTS, [params, SamplingParams(max_tokens=48, cache="prefix"), SamplingParams(max_tokens=20, unmask="threshold")])
    assert batched[0].token_ids == alone.token_ids
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_cuda_matches_cpu_greedy_tokens_for_each_cache(llada_dir, cache):
    params = SamplingParams(max_tokens=32, block_length=16, cache=cache)
    cpu = LLM(str(llada_dir), device="cpu").generate(PROMPTS[0], params)[0]
    gpu = LLM(str(llada_dir), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20).generate(PROMPTS[0], params)[0]
    agree = sum(a == b for a, b in zip(cpu.token_ids, gpu.token_ids))
    assert agree >= 0.9 * len(cpu.token_ids)


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "eager"])
def test_a_step_waits_for_the_gpu_once_to_read_its_proposals(llada_dir, cache, graphs):
    engine = _engine(llada_dir, cuda_graph_max_tokens=2048 if graphs else 0)
    for i, p in enumerate(PROMPTS):  # greedy and sampled rows in one step
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=64, block_length=32, cache=cache, temperature=0.7 * i, seed=i))
    for _ in range(3):  # graphs captured, kernels compiled
        engine.step()
    torch.cuda.set_sync_debug_mode("warn")  # every host synchronisation then warns
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_a_seeded_sampled_request_gives_the_same_tokens_on_cpu_and_gpu(bundled_model_dir):
    """One noise function on both devices: in fp32 the trained model's logits differ by rounding only,
    far below the gaps between its sampled keys, so every token agrees."""
    params = SamplingParams(max_tokens=32, block_length=16, cache="dual", temperature=0.8, seed=21)
    cpu = LLM(str(bundled_model_dir), device="cpu").generate(PROMPTS[0], params)[0]
    gpu = LLM(str(bundled_model_dir), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20).generate(PROMPTS[0], params)[0]
    assert gpu.token_ids == cpu.token_ids

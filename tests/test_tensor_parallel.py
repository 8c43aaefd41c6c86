"""Tensor parallelism (engine.parallel): a model split over ranks decodes exactly like one process.

The CPU tests run two ranks with gloo: rank 0 in the test process, rank 1 in
a worker process the engine spawns. Weights are fp32, so the only difference
from one process is the order of a few sums, and the tokens are the same.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.errors import EngineDeadError
from unmask.engine.models.checkpoint import read_config
from unmask.engine.models.make_random import PRESETS, make_random_checkpoint, write_config_only
from unmask.engine.parallel.layers import VocabShard
from unmask.engine.parallel.loading import CheckpointShards
from unmask.engine.parallel.state import ParallelState
from unmask.engine.parallel.vocab import blank_columns, combine_stats, shard_stats
from unmask.engine.params import ParamError, SamplingParams
from unmask.engine.runner_interface import Runner
from unmask.kernels.confidence import fused_confidence_reference

REPO = Path(__file__).resolve().parent.parent
KV = 8 * 2**20

# Several requests batched together: both cache policies, three unmask rules, the fused
# confidence path and the paths that gather full logits (margin; top-p sampling).
REQUESTS = [
    ("Hello world", SamplingParams(max_tokens=32, block_length=16, cache="none")),
    ("The quick brown fox", SamplingParams(max_tokens=24, block_length=8, cache="dual", unmask="threshold")),
    ("What is 12 plus 30?", SamplingParams(max_tokens=32, block_length=16, cache="dual", confidence="margin")),
    ("Sort: apple", SamplingParams(max_tokens=16, cache="none", temperature=0.7, top_p=0.9, seed=3)),
    ("Diffusion language models", SamplingParams(max_tokens=24, block_length=8, cache="dual", steps=4)),
]


def generate(engine: LLMEngine, requests: list[tuple[str, SamplingParams]]) -> list[list[int]]:
    """Every request's output tokens (up to end-of-text), all admitted before the first step.

    Not the whole canvas: once end-of-text is committed the rest of its block is
    never read, and which of those positions got filled before the request ended
    can turn on near-ties that the ranks' summation order decides.
    """
    seqs = [engine.add_request(f"r{i}", prompt, params) for i, (prompt, params) in enumerate(requests)]
    while engine.has_unfinished:
        engine.step()
    return [seq.committed_prefix() for seq in seqs]


@contextmanager
def tp_engine(model_dir, **config):
    """A two-rank engine, closed (its worker stopped) on the way out."""
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), tensor_parallel_size=2, **({"kv_cache_memory": KV} | config)))
    try:
        yield engine
    finally:
        engine.close()


def single_engine(model_dir, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model_dir), kv_cache_memory=KV, **config))


# --- the vocabulary-parallel reduction (no processes) -------------------------------------------------


def reduce_in_shards(logits: torch.Tensor, tp: int, temperature: torch.Tensor, mask_id: int = 0):
    """What `tp` ranks compute from their slices of `logits`, combined as the gathered stats are."""
    vocab = logits.shape[1]
    seeds = torch.arange(logits.shape[0]) * 7919
    stats = []
    for rank in range(tp):
        shard = VocabShard.of(vocab, rank, tp)
        local = torch.zeros(logits.shape[0], shard.size)
        local[:, : shard.valid] = logits[:, shard.start : shard.start + shard.valid]
        blank_columns(local, shard, mask_id)
        stats.append(shard_stats(local, shard, temperature, seeds).pack())
    return combine_stats(torch.stack(stats))


@pytest.mark.parametrize("tp", [1, 2, 3, 8])
def test_vocab_parallel_greedy_confidence_equals_the_full_logit_computation(tp):
    logits = torch.randn(9, 50, generator=torch.Generator().manual_seed(tp)) * 3
    tokens, confidence = reduce_in_shards(logits, tp, torch.zeros(9), mask_id=4)
    full = logits.clone()
    full[:, 4] = float("-inf")
    want_tokens, want_confidence = fused_confidence_reference(full)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(confidence, want_confidence, rtol=1e-6, atol=1e-7)


def test_vocab_parallel_greedy_ties_go_to_the_lowest_token_id_as_in_a_full_argmax():
    logits = torch.zeros(2, 8)
    logits[:, [2, 5]] = 1.0  # token 2 on rank 0, token 5 on rank 1
    tokens, _ = reduce_in_shards(logits, 2, torch.zeros(2), mask_id=7)
    assert tokens.tolist() == [2, 2]


def test_vocab_parallel_sampling_does_not_depend_on_how_the_vocabulary_is_split():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    temperature = torch.full((16,), 0.8)
    one, one_conf = reduce_in_shards(logits, 1, temperature)
    three, three_conf = reduce_in_shards(logits, 3, temperature)
    assert torch.equal(one, three)
    torch.testing.assert_close(one_conf, three_conf)


def test_vocab_parallel_sampling_draws_the_single_device_tokens():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(2)) * 2
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0]).repeat(16)
    full = logits.clone()
    full[:, 0] = float("-inf")  # what blank_columns does to the mask token on its rank
    want, want_conf = fused_confidence_reference(full, temperature, torch.arange(64) * 7919)
    for tp in (2, 3):
        tokens, confidence = reduce_in_shards(logits, tp, temperature)
        # The same fp32 keys from the same logits: no rounding to allow for here.
        assert torch.equal(tokens, want), tp
        torch.testing.assert_close(confidence, want_conf)


def test_vocab_parallel_sampling_draws_from_the_tempered_softmax():
    rows, temperature = 4000, 0.5
    logits = torch.tensor([0.0, 0.5, 1.0, -10.0, 0.2]).repeat(rows, 1)  # token 0 is the mask
    tokens, _ = reduce_in_shards(logits, 2, torch.full((rows,), temperature), mask_id=0)
    want = logits[0, 1:].div(temperature).softmax(-1)
    seen = torch.bincount(tokens, minlength=5)[1:].float() / rows
    torch.testing.assert_close(seen, want, atol=0.03, rtol=0)
    assert 0 not in tokens.tolist()


def test_vocab_parallel_confidence_of_a_sampled_token_is_its_probability():
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(1))
    tokens, confidence = reduce_in_shards(logits, 2, torch.full((6,), 1.5), mask_id=29)
    full = logits.clone()
    full[:, 29] = float("-inf")
    torch.testing.assert_close(confidence, full.softmax(-1).gather(1, tokens[:, None]).squeeze(1))


# --- sharded loading (no processes: loading needs no group) -------------------------------------------


def test_each_rank_loads_only_its_slice_of_every_tensor(model_dir):
    full = single_engine(model_dir).loaded.model.state_dict()
    cfg = read_config(model_dir)
    shards = [CheckpointShards(str(model_dir)).load(ParallelState(r, 2, torch.device("cpu"))) for r in (0, 1)]
    params = [dict(s.model.named_parameters()) for s in shards]
    layer = "layers.1"
    for name, dim in [
        (f"{layer}.attn.q_proj.weight", 0),
        (f"{layer}.attn.k_proj.weight", 0),
        (f"{layer}.mlp.up_proj.weight", 0),
        (f"{layer}.attn.o_proj.weight", 1),
        (f"{layer}.mlp.down_proj.weight", 1),
        ("embed.weight", 0),
        ("lm_head.weight", 0),
    ] + ([(f"{layer}.attn.v_proj.bias", 0)] if cfg.qkv_bias else []):
        torch.testing.assert_close(torch.cat([p[name] for p in params], dim)[: full[name].shape[0]], full[name])
        assert params[0][name].shape[dim] * 2 >= full[name].shape[dim]
    assert torch.equal(params[1]["final_norm.weight"], full["final_norm.weight"])
    assert shards[1].model.layers[0].attn.num_kv_heads == cfg.num_kv_heads // 2
    assert shards[1].tokenizer is None


def test_a_vocabulary_that_does_not_divide_is_zero_padded_on_the_last_rank(tmp_path):
    ckpt = make_random_checkpoint(tmp_path, arch="llada", layers=1, hidden=32, heads=2, vocab=301)
    vocab = read_config(ckpt).vocab_size
    assert vocab % 2
    last = CheckpointShards(str(ckpt)).load(ParallelState(1, 2, torch.device("cpu"))).model.embed.weight
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        whole = f.get_tensor("model.transformer.wte.weight")
    half = -(-vocab // 2)
    torch.testing.assert_close(last[: vocab - half], whole[half:])
    assert not last[vocab - half :].any()


def test_tensor_parallelism_refuses_the_feature_cache():
    with pytest.raises(ValueError, match="feature_cache"):
        EngineConfig(model_dir="m", tensor_parallel_size=2, feature_cache=True)


# --- two ranks on the CPU (gloo) ------------------------------------------------------------------------


def test_tp2_generates_the_same_tokens_as_one_process_for_a_mixed_batch(model_dir):
    want = generate(single_engine(model_dir), REQUESTS)
    with tp_engine(model_dir) as engine:
        assert generate(engine, REQUESTS) == want
        assert engine.pool.num_free == engine.pool.num_pages


def test_both_runners_implement_the_runner_interface_over_the_engines_pages(llada_dir):
    single = single_engine(llada_dir)
    with tp_engine(llada_dir) as engine:
        for e in (single, engine):
            assert isinstance(e.runner, Runner)
            assert e.pool.num_pages == e.runner.num_pages  # the allocator hands out the runner's pages
    assert type(single.runner) is not type(engine.runner)


def test_tp2_samples_the_same_tokens_as_one_process(llada_dir):
    """The fused path's sampled rows: each rank reduces its shard with the single device's noise."""
    sampled = [
        ("Hello world", SamplingParams(max_tokens=32, block_length=16, temperature=1.0, seed=11, cache="dual")),
        ("The quick brown fox", SamplingParams(max_tokens=24, block_length=8, temperature=0.6, seed=5, unmask="threshold")),
    ]
    want = generate(single_engine(llada_dir), sampled)
    with tp_engine(llada_dir) as engine:
        assert generate(engine, sampled) == want


def test_tp2_sampling_is_seeded_and_the_same_alone_or_batched(llada_dir):
    sampled = ("Hello world", SamplingParams(max_tokens=32, block_length=16, temperature=1.0, seed=11, cache="dual"))
    with tp_engine(llada_dir) as engine:
        alone = generate(engine, [sampled])[0]
        batched = generate(engine, [REQUESTS[0], sampled, REQUESTS[1]])[1]
    assert alone == batched


def test_tp2_logprobs_and_top_k_match_one_process(llada_dir):
    """Requests with logprobs or top-k take the gathered-logits path on the ranks; the numbers agree with one process."""
    requests = [
        ("Hello world", SamplingParams(max_tokens=16, block_length=8, logprobs=2, ignore_eos=True)),
        ("The quick brown fox", SamplingParams(max_tokens=16, temperature=2.0, seed=4, top_k=3, min_p=0.01, ignore_eos=True)),
    ]

    def run(engine):
        seqs = [engine.add_request(f"r{i}", prompt, params) for i, (prompt, params) in enumerate(requests)]
        outputs = {}
        while engine.has_unfinished:
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
        return [outputs[s.request_id] for s in seqs]

    want = run(single_engine(llada_dir))
    with tp_engine(llada_dir) as engine:
        got = run(engine)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [e.logprob for e in got[0].logprobs] == pytest.approx([e.logprob for e in want[0].logprobs], abs=1e-4)


def test_tp2_refuses_prompt_scoring(llada_dir):
    with tp_engine(llada_dir) as engine, pytest.raises(ParamError) as refused:
        engine.make_scoring_job("s", [5, 9, 12], 0)
    assert refused.value.param == "logprobs"


def test_tp2_load_format_dummy_draws_each_ranks_shard_of_a_config_only_directory(tmp_path):
    model_dir = write_config_only(tmp_path, PRESETS["tiny"])
    with tp_engine(model_dir, load_format="dummy") as engine:
        assert engine.loaded.model.embed.weight.shape[0] == -(-engine.model_config.vocab_size // 2)
        (tokens,) = generate(engine, [("Hello world", SamplingParams(max_tokens=24, block_length=8, ignore_eos=True))])
    assert len(tokens) == 24


def test_close_stops_every_worker(llada_dir):
    with tp_engine(llada_dir) as engine:
        workers = engine.parallel.workers.processes
        assert all(w.is_alive() for w in workers)
    assert [w.exitcode for w in workers] == [0]


def test_a_failure_inside_a_step_kills_the_workers_and_the_engine_reports_it_dead(llada_dir):
    def fail(*_):
        raise RuntimeError("injected")

    with tp_engine(llada_dir) as engine:
        workers = engine.parallel.workers.processes
        engine.add_request("r", "Hello world", SamplingParams(max_tokens=16))
        # Rank 0 fails after its first layer, while the worker waits in that layer's all-reduce.
        engine.runner.rank.runner.model.layers[0].register_forward_hook(fail)
        with pytest.raises(EngineDeadError, match="injected"):
            engine.step()
        assert not any(w.is_alive() for w in workers)
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            engine.step()
        assert time.monotonic() - started < 1.0


class FailingWorkerShards(CheckpointShards):
    """Shards whose rank 1 raises inside its first layer (in the worker process)."""

    def load(self, state):
        loaded = super().load(state)
        if state.rank == 1:
            loaded.model.layers[0].register_forward_hook(_raise_in_worker)
        return loaded


def _raise_in_worker(*_):
    raise RuntimeError("injected in the worker")


def test_a_worker_failing_inside_a_step_ends_the_engine_with_its_traceback(llada_dir):
    config = EngineConfig(model_dir=str(llada_dir), tensor_parallel_size=2, kv_cache_memory=KV)
    engine = LLMEngine(config, shards=FailingWorkerShards(str(llada_dir)))
    try:
        engine.add_request("r", "Hello world", SamplingParams(max_tokens=16))
        with pytest.raises(EngineDeadError, match="injected in the worker"):
            engine.step()
        assert not any(w.is_alive() for w in engine.parallel.workers.processes)
    finally:
        engine.close()


_DYING_ENGINE = """
import os, sys
from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.params import SamplingParams

engine = LLMEngine(EngineConfig(model_dir=sys.argv[1], kv_cache_memory=2**23, tensor_parallel_size=2))
print(*[w.pid for w in engine.parallel.workers.processes], flush=True)
engine.add_request("r", "Hello world", SamplingParams(max_tokens=16))
engine.runner.rank.runner.model.layers[0].register_forward_hook(lambda *_: os._exit(3))
engine.step()  # the engine process dies mid-step, its worker inside a collective
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_workers_exit_when_the_engine_process_dies(llada_dir):
    done = subprocess.run(
        [sys.executable, "-c", _DYING_ENGINE, str(llada_dir)],
        cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 3, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(p) for p in pids)


def test_tp2_matches_one_process_on_the_bundled_model(bundled_model_dir):
    cfg = read_config(bundled_model_dir)
    if cfg.num_kv_heads % 2 or cfg.intermediate_size % 2:
        pytest.skip("the bundled model's heads do not split over two ranks")
    requests = [
        ("What is 12 plus 30?", SamplingParams(max_tokens=32, block_length=16, cache="dual")),
        ("Sort: banana, apple, cherry.", SamplingParams(max_tokens=32, block_length=16, cache="none")),
    ]
    want = generate(single_engine(bundled_model_dir), requests)
    with tp_engine(bundled_model_dir) as engine:
        assert generate(engine, requests) == want


# --- two GPUs (NCCL) ---------------------------------------------------------------------------------------

GPU_REQUESTS = [
    ("Hello world", SamplingParams(max_tokens=64, block_length=32, cache="none")),
    ("The quick brown fox", SamplingParams(max_tokens=64, block_length=32, cache="dual")),
    ("What is 12 plus 30?", SamplingParams(max_tokens=64, block_length=32, cache="dual", unmask="threshold")),
    ("Sort: apple", SamplingParams(max_tokens=32, block_length=32, cache="prefix", confidence="margin")),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.fixture(scope="module")
def llada_8b_shaped_dir(tmp_path_factory) -> Path:
    # LLaDA-8B's widths (hidden 4096, 32 heads, FFN 12288, vocabulary 126464) with 4 of its 32
    # layers: every split and reduction is the real model's, but writing and loading the random
    # checkpoint takes a minute rather than ten.
    return make_random_checkpoint(
        tmp_path_factory.mktemp("llada8b"), arch="llada", layers=4, hidden=4096, heads=32,
        vocab=126464, intermediate=12288, dtype=torch.bfloat16, max_shard_bytes=2**31,
    )


@pytest.fixture(scope="module")
def one_gpu_tokens(llada_8b_shaped_dir) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model_dir=str(llada_8b_shaped_dir), device="cuda", dtype="float32", kv_cache_memory=2**31))
    tokens = generate(engine, GPU_REQUESTS)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return tokens


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("graph_tokens", [0, 2048], ids=["eager", "cuda-graphs"])
def test_tp2_on_two_gpus_matches_one_gpu_on_an_llada_8b_shaped_model(llada_8b_shaped_dir, one_gpu_tokens, graph_tokens):
    """fp32, so the ranks differ from one GPU only in the order of sums; a near-tie between two
    confidences can still flip one commit (and the rest of its block), hence 98% and not 100%."""
    with tp_engine(
        llada_8b_shaped_dir, device="cuda", dtype="float32", kv_cache_memory=2**31, cuda_graph_max_tokens=graph_tokens
    ) as engine:
        assert (engine.runner.graphs is not None) == (graph_tokens > 0)
        got = generate(engine, GPU_REQUESTS)
    same = sum(a == b for want, have in zip(one_gpu_tokens, got) for a, b in zip(want, have))
    total = sum(len(t) for t in one_gpu_tokens)
    assert same >= 0.98 * total, f"{total - same} of {total} tokens differ"


@pytest.mark.parametrize("arch", ["sdar", "fastdllm-v2"])
def test_tp2_decodes_a_block_causal_model_like_one_process(tmp_path, arch):
    """Per-head q/k norms replicated, block-causal attention on each rank's heads, the block caches."""
    model_dir = make_random_checkpoint(tmp_path, arch=arch, layers=2, hidden=64, heads=4, kv_heads=2, layer_std=0.2)
    requests = [
        ("Hello world", SamplingParams(max_tokens=20, cache="block", unmask="threshold", threshold=0.5)),
        ("The quick brown fox", SamplingParams(max_tokens=24, cache="block-dual", ignore_eos=True)),
        ("What is 12 plus 30?", SamplingParams(max_tokens=16, cache="none", ignore_eos=True)),
    ]
    want = generate(single_engine(model_dir), requests)
    with tp_engine(model_dir) as engine:
        assert generate(engine, requests) == want


def test_each_rank_loads_its_slice_of_every_experts_ffn_and_the_whole_router(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="llada2", layers=2, hidden=64, heads=4)
    full = single_engine(model_dir).loaded.model.state_dict()
    shards = [CheckpointShards(str(model_dir)).load(ParallelState(r, 2, torch.device("cpu"))) for r in (0, 1)]
    params = [dict(s.model.named_parameters()) for s in shards]
    mlp = "layers.1.mlp"
    for name, dim in [(f"{mlp}.experts.5.gate_proj.weight", 0), (f"{mlp}.experts.5.down_proj.weight", 1),
                      (f"{mlp}.shared_expert.up_proj.weight", 0), (f"{mlp}.shared_expert.down_proj.weight", 1),
                      ("layers.1.attn.k_proj.weight", 0)]:
        torch.testing.assert_close(torch.cat([p[name] for p in params], dim), full[name])
        assert params[0][name].shape[dim] * 2 == full[name].shape[dim]
    for name in (f"{mlp}.gate.weight", f"{mlp}.gate.expert_bias"):
        assert torch.equal(params[1][name], full[name])


@pytest.mark.parametrize("arch", ["llada-moe", "llada2", "sdar-moe"])
def test_tp2_decodes_a_mixture_of_experts_model_like_one_process(tmp_path, arch):
    """Experts split by their FFN width, the router replicated, one all-reduce per routed layer."""
    model_dir = make_random_checkpoint(tmp_path, arch=arch, layers=2, hidden=64, heads=4, layer_std=0.2)
    cache = "dual" if arch == "llada-moe" else "block"
    requests = [
        ("Hello world", SamplingParams(max_tokens=20, cache=cache, unmask="threshold", threshold=0.5)),
        ("The quick brown fox", SamplingParams(max_tokens=24, cache="none", unmask="low_confidence", ignore_eos=True)),
    ]
    want = generate(single_engine(model_dir), requests)
    with tp_engine(model_dir) as engine:
        assert generate(engine, requests) == want

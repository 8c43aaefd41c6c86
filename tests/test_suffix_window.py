"""The suffix window: masked blocks more than `suffix_window` blocks past the current one are neither
recomputed nor attended, with every cache that reads it; the positions kept keep their absolute indices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server_fixtures import live_server  # noqa: F401  (pytest fixture)

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.infill import Infill
from unmask.engine.method_params import METHOD_PARAMS_BY_NAME
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams
from unmask.engine.policies import CACHE_POLICIES
from unmask.engine.runner import SequenceWork
from unmask.engine.sequence import Sequence

MASK, EOS = 99, 98
PROMPT = [5, 9, 13, 17, 21, 25]
WINDOW_CACHES = METHOD_PARAMS_BY_NAME["suffix_window"].methods
CACHE_PARAMS = {"dkv": dict(dkv_refresh=3), "dkv-greedy": dict(dkv_window=1)}


def sequence(cache: str, window: int | None, max_tokens: int = 40, block_length: int = 8) -> Sequence:
    params = SamplingParams(
        max_tokens=max_tokens, block_length=block_length, cache=cache, suffix_window=window, **CACHE_PARAMS.get(cache, {})
    ).resolve(EngineDefaults())
    return Sequence("r", [1, 2, 3, 4], params, MASK, EOS, seed=0)


def commit_two(seq: Sequence) -> None:
    """One step's commit: the first two masked positions of the block (a stand-in for any unmask policy)."""
    targets = seq.masked_in_block()[:2]
    seq.commit(targets, torch.full_like(targets, 7))


def walk(cache: str, window: int | None, **shape) -> list[tuple[list[int], int | None, int]]:
    """Every step's (active positions, key length, window end) of a sequence decoded two tokens a step."""
    seq, policy = sequence(cache, window, **shape), CACHE_POLICIES[cache]
    steps = []
    while not seq.canvas_done:
        _, block_end = seq.block_bounds()
        end = seq.length if window is None else min(seq.length, block_end + window * seq.block_size)
        steps.append((policy.active_positions(seq).tolist(), policy.key_length(seq), end))
        commit_two(seq)
    return steps


# --- the window's semantics, step by step ----------------------------------------------------------


def test_the_window_ends_w_blocks_after_the_current_block_and_never_past_the_sequence():
    # prompt 4, canvas 40 in blocks of 8: blocks end at 12, 20, 28, 36, 44 (the sequence's end)
    ends = sorted({end for _, _, end in walk("none", 1)})
    assert ends == [20, 28, 36, 44]
    assert sorted({end for _, _, end in walk("none", 0)}) == [12, 20, 28, 36, 44]


@pytest.mark.parametrize("cache", WINDOW_CACHES)
def test_keys_end_at_the_window_end(cache):
    for _, key_length, end in walk(cache, 1):
        assert key_length == (None if end == 44 else end)


@pytest.mark.parametrize("cache", WINDOW_CACHES)
def test_each_step_recomputes_what_the_policy_would_without_the_window_cut_at_the_window_end(cache):
    for (windowed, _, end), (plain, plain_keys, _) in zip(walk(cache, 1), walk(cache, None), strict=True):
        assert plain_keys is None
        assert windowed == [p for p in plain if p < end]


@pytest.mark.parametrize("cache", WINDOW_CACHES)
def test_every_attended_position_was_computed_at_or_before_the_step_that_attends_to_it(cache):
    """A position the window newly reaches has never been written; the step that first attends to it computes it."""
    written: set[int] = set()
    for active, key_length, end in walk(cache, 1):
        written |= set(active)
        assert set(range(end)) <= written, f"keys [0, {end}) read unwritten K/V"


@pytest.mark.parametrize("cache", WINDOW_CACHES)
def test_a_window_covering_the_canvas_changes_nothing(cache):
    assert walk(cache, 5) == [(active, None, 44) for active, _, _ in walk(cache, None)]


@pytest.mark.parametrize("cache", ["freecache", "dllm-cache"])
def test_caches_with_their_own_rule_do_not_read_the_window(cache):
    assert not CACHE_POLICIES[cache].reads_suffix_window and cache not in WINDOW_CACHES


def test_the_caches_that_read_the_window_are_exactly_those_the_parameter_names():
    assert {name for name, p in CACHE_POLICIES.items() if p.reads_suffix_window} == set(WINDOW_CACHES)


# --- in the engine ---------------------------------------------------------------------------------


def make_engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model_dir), device="cpu", kv_cache_memory=8 * 2**20))


def decode(engine: LLMEngine, params: SamplingParams) -> Sequence:
    seq = engine.add_request("r", PROMPT, params)
    while engine.has_unfinished:
        engine.step()
    return seq


def decode_with_and_without(model_dir: Path, cache: str, window: int, max_tokens: int) -> tuple[Sequence, Sequence]:
    """The same request (blocks of 8, 4 steps each, the whole canvas) decoded without a window, then with `window`."""
    engine = make_engine(model_dir)
    shape = dict(max_tokens=max_tokens, block_length=8, steps=4, ignore_eos=True, seed=3, cache=cache, **CACHE_PARAMS.get(cache, {}))
    return decode(engine, SamplingParams(**shape)), decode(engine, SamplingParams(suffix_window=window, **shape))


@pytest.mark.parametrize("cache", WINDOW_CACHES)
def test_decoding_with_a_window_covering_the_canvas_equals_decoding_without_it(model_dir, cache):
    plain, covered = decode_with_and_without(model_dir, cache, window=4, max_tokens=40)
    assert covered.tokens.tolist() == plain.tokens.tolist()
    assert covered.stats.active_positions == plain.stats.active_positions


@pytest.mark.parametrize("cache", WINDOW_CACHES)
def test_a_narrow_window_recomputes_fewer_positions(model_dir, cache):
    plain, windowed = decode_with_and_without(model_dir, cache, window=1, max_tokens=64)
    assert windowed.stats.active_positions < plain.stats.active_positions
    assert windowed.stats.forward_passes == plain.stats.forward_passes


def test_a_windowed_step_equals_a_dense_forward_of_the_sequence_cut_at_the_window_end(model_dir):
    """Mid-decode, with the same absolute positions (RoPE) as the whole sequence would have."""
    engine = make_engine(model_dir)
    seq = engine.add_request("r", PROMPT, SamplingParams(max_tokens=48, block_length=8, steps=2, suffix_window=1, ignore_eos=True))
    while seq.block < 2:
        engine.step()
    policy = CACHE_POLICIES["none"]
    sources = seq.masked_in_block() - engine.model_config.logits_shift
    work = SequenceWork(seq, policy.active_positions(seq), sources, policy.key_length(seq))
    logits = engine.runner.run([work])
    cut = seq.prompt_len + 8 * 4  # blocks 0-2 and the window's one block
    assert work.key_length == cut and work.positions.tolist() == list(range(cut))
    dense = engine.loaded.model.forward_dense(seq.tokens[None, :cut])[0]
    torch.testing.assert_close(logits, dense[work.logit_positions], rtol=1e-4, atol=1e-4)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_an_invalid_window_is_refused_naming_the_field(value):
    with pytest.raises(ParamError) as refused:
        SamplingParams(suffix_window=value, cache="dual").resolve(EngineDefaults())
    assert refused.value.param == "suffix_window"


@pytest.mark.parametrize("cache", ["freecache", "dllm-cache"])
def test_a_window_beside_a_cache_that_does_not_read_it_is_refused(cache):
    with pytest.raises(ParamError) as refused:
        SamplingParams(suffix_window=1, cache=cache).resolve(EngineDefaults())
    assert refused.value.param == "suffix_window" and cache in refused.value.message


def test_a_window_on_an_infill_request_with_a_suffix_is_refused(llada_dir):
    engine = make_engine(llada_dir)
    with pytest.raises(ParamError) as refused:
        engine.make_sequence("r", Infill(("The quick", " fox"), (8,)), SamplingParams(cache="dual", suffix_window=1))
    assert refused.value.param == "suffix_window" and "fixed text" in refused.value.message


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sdar"), arch="sdar", layers=1, hidden=64, heads=4)


@pytest.mark.parametrize("cache", [None, "none"])
def test_a_window_on_a_block_causal_model_is_refused(sdar_dir, cache):
    """Nothing attends past its own block there, so there is no suffix to drop: with its own cache
    (`block`, which reads no window) or with `none`, the request is refused naming the field."""
    engine = make_engine(sdar_dir)
    with pytest.raises(ParamError) as refused:
        engine.make_sequence("r", PROMPT, SamplingParams(max_tokens=8, cache=cache, suffix_window=1))
    assert refused.value.param == "suffix_window"


def test_a_server_default_window_does_not_reach_block_causal_requests(sdar_dir):
    engine = LLMEngine(EngineConfig(
        model_dir=str(sdar_dir), device="cpu", kv_cache_memory=8 * 2**20, defaults=EngineDefaults(suffix_window=1)
    ))
    assert engine.make_sequence("r", PROMPT, SamplingParams(max_tokens=8)).params.suffix_window is None


def test_a_window_is_a_400_naming_the_field_over_http(live_server):
    body = {"model": live_server.model, "prompt": "Hello", "max_tokens": 8, "cache": "dual", "suffix_window": -1}
    with live_server.http() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "suffix_window"


# --- on a GPU (skipped without CUDA) ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_cuda_matches_cpu_greedy_tokens_with_a_window(llada_dir, cache):
    """The Triton attention reads keys [0, key length) as the CPU reference does."""
    params = SamplingParams(max_tokens=64, block_length=16, cache=cache, suffix_window=1, ignore_eos=True)
    cpu = LLMEngine(EngineConfig(model_dir=str(llada_dir), device="cpu", kv_cache_memory=8 * 2**20))
    gpu = LLMEngine(EngineConfig(model_dir=str(llada_dir), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20))
    cpu_tokens, gpu_tokens = (decode(e, params).tokens.tolist() for e in (cpu, gpu))
    assert sum(a == b for a, b in zip(cpu_tokens, gpu_tokens)) >= 0.9 * len(cpu_tokens)


@pytest.mark.gpu
def test_on_cuda_a_windowed_answer_costs_the_same_under_a_long_canvas():
    from benchmarks.answer_cost import main as answer_cost

    rows = answer_cost(["--arch", "tiny", "--device", "cuda", "--answer", "64", "--max-tokens", "128", "1024",
                        "--cache", "none", "dual", "--window", "1"])
    for row in rows:
        if row.window is not None:
            assert row.costs[128].positions == row.costs[1024].positions
            assert row.ratio("seconds") <= 1.5, row

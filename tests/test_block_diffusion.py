"""Block-causal models (SDAR, Fast-dLLM v2): the native forward and the exact block cache against a dense reference.

The reference (`block_reference.py`) is independent of the engine's model:
plain fp32 PyTorch over the checkpoint's tensors with an explicit
block-causal mask. The random checkpoints have large layer weights
(`layer_std=0.2`), so what a position predicts depends on its context (a
test checks it), and matching the reference token for token means something.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from block_reference import QwenReference
from engine_checks import assert_cuda_decodes_like_the_cpu, assert_dummy_preset_generates, assert_whole_forward_matches

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.infill import Infill
from unmask.engine.llm import LLM
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams
from unmask.engine.runner import SequenceWork

FORWARD_TOLERANCE = 1e-4  # fp32 logits of two layers: the native forward and the reference differ by rounding only
FAMILIES = ("sdar", "fastdllm-v2")


@pytest.fixture(scope="module", params=FAMILIES)
def block_dir(request, tmp_path_factory) -> Path:
    return make_random_checkpoint(
        tmp_path_factory.mktemp(request.param), arch=request.param, layers=2, hidden=64, heads=4, kv_heads=2, layer_std=0.2
    )


@pytest.fixture(scope="module")
def reference(block_dir) -> QwenReference:
    return QwenReference(block_dir)


def _engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(model_dir), kv_cache_memory=8 * 2**20))


def _admit(engine: LLMEngine, request_id: str, prompt: list[int], max_tokens: int, **params):
    seq = engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params))
    engine.scheduler.admit()
    return seq


def _prompt(n: int, first: int = 10) -> list[int]:
    return [first, *range(40, 40 + n - 1)]


def test_random_checkpoints_predict_from_context(reference):
    """Changing the first prompt token changes what the last block predicts, so token-for-token tests can fail."""
    a, b = reference.logits(_prompt(12, first=10)), reference.logits(_prompt(12, first=11))
    assert (a[8:].argmax(-1) != b[8:].argmax(-1)).any()


def test_native_packed_paged_forward_matches_the_dense_block_causal_reference(block_dir, reference):
    engine = _engine(block_dir)
    seqs = [_admit(engine, f"r{n}", _prompt(n), m) for n, m in ((5, 16), (11, 21))]
    assert_whole_forward_matches(engine, seqs, reference, FORWARD_TOLERANCE)


def test_a_block_step_over_cached_pages_matches_the_reference(block_dir, reference):
    """The current block alone, keys ending at its end, over the exact K/V the earlier blocks left in the pages."""
    engine = _engine(block_dir)
    seq = _admit(engine, "r", _prompt(6), 18)
    seq.tokens[seq.prompt_len : seq.prompt_len + 10] = torch.arange(100, 110)
    block_start, block_end = 16, 24
    engine.runner.run([SequenceWork(seq, torch.arange(block_start), torch.arange(1))])  # fill the pages
    block = torch.arange(block_start, block_end)
    logits = engine.runner.run([SequenceWork(seq, block, block, key_length=block_end)])
    expected = reference.logits(seq.tokens[:block_end].tolist())[block_start:block_end]
    torch.testing.assert_close(logits.float(), expected, rtol=FORWARD_TOLERANCE, atol=FORWARD_TOLERANCE)


@pytest.mark.parametrize("cache", ["block", "none"])
@pytest.mark.parametrize("prompt_len", [6, 8, 16])  # inside a block, on a block edge of SDAR's 4, on both families' edges
@pytest.mark.parametrize("rule", ["one_per_step", "threshold"])
def test_engine_decodes_token_for_token_like_the_dense_reference(block_dir, reference, cache, prompt_len, rule):
    prompt = _prompt(prompt_len)
    expected = reference.reference_decode(prompt, 21, rule, threshold=0.3)
    unmask = {"one_per_step": {"unmask": "low_confidence"}, "threshold": {"unmask": "threshold", "threshold": 0.3}}[rule]
    out = LLM(str(block_dir)).generate(prompt, SamplingParams(max_tokens=21, cache=cache, ignore_eos=True, **unmask))[0]
    assert out.token_ids == expected


def test_block_cache_recomputes_each_block_once_after_it_completes(tmp_path):
    """SDAR, blocks of 4, prompt 6, one token per step, canvas to 16: the positions each step recomputes."""
    model_dir = make_random_checkpoint(tmp_path, arch="sdar", layers=1, hidden=32, heads=2, layer_std=0.2)
    out = LLM(str(model_dir)).generate(_prompt(6), SamplingParams(max_tokens=8, cache="block", ignore_eos=True))[0]
    first_block = [8, 4]  # [0, 8): the prompt and the block [4, 8) it ends in; then that block
    second_block = [8, 4, 4, 4]  # [4, 12): the finished block once more and [8, 12); then [8, 12)
    third_block = [8, 4, 4, 4]  # [8, 16), then [12, 16)
    assert out.stats.active_positions == sum(first_block + second_block + third_block)
    assert out.stats.forward_passes == 10


def test_fastdllm_v2_writes_each_blocks_first_token_from_the_previous_block_alone(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="fastdllm-v2", layers=1, hidden=32, heads=2, layer_std=0.2)
    engine = _engine(model_dir)
    seq = engine.add_request("r", _prompt(8), SamplingParams(max_tokens=16, cache="block", unmask="threshold", ignore_eos=True))
    engine.step()  # the prompt fills one block of 8: the first step computes it and commits position 8 alone
    assert (seq.tokens[8:] == engine.model_config.mask_token_id).tolist() == [False] + [True] * 15
    assert seq.stats.active_positions == 8


def test_block_dual_recomputes_only_the_sub_block_once_its_first_token_is_committed(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="fastdllm-v2", layers=1, hidden=32, heads=2, layer_std=0.2)
    engine = _engine(model_dir)
    seq = engine.add_request("r", _prompt(8), SamplingParams(max_tokens=16, cache="block-dual", unmask="low_confidence", ignore_eos=True))
    recomputed = []
    while seq.block == 0:
        before = seq.stats.active_positions
        engine.step()
        recomputed.append(seq.stats.active_positions - before)
    # Blocks of 8 in sub-blocks of 4, the prompt filling [0, 8), one token per step:
    # the entry step ([0, 8), writes position 8), the block's first denoising step (whole),
    # two more steps of the sub-block [8, 12) alone, then the whole block while position 12
    # is masked and the sub-block [12, 16) alone once it is not.
    assert recomputed[:5] == [8, 8, 4, 4, 8]
    assert set(recomputed[5:]) <= {4, 8} and len(recomputed) == 8


@pytest.mark.parametrize("cache", ["prefix", "dual", "dkv", "dkv-greedy", "dllm-cache", "freecache"])
def test_full_attention_caches_are_refused_for_block_causal_models_naming_the_field(block_dir, cache):
    engine = _engine(block_dir)
    with pytest.raises(ParamError, match="block-causal") as refused:
        engine.make_sequence("r", _prompt(5), SamplingParams(max_tokens=8, cache=cache))
    assert refused.value.param == "cache"


def test_a_block_length_other_than_the_trained_one_is_refused(block_dir):
    engine = _engine(block_dir)
    with pytest.raises(ParamError, match="block_length must be") as refused:
        engine.make_sequence("r", _prompt(5), SamplingParams(max_tokens=8, block_length=3))
    assert refused.value.param == "block_length"


def test_a_max_tokens_past_the_context_is_refused_before_its_canvas_is_made(block_dir):
    engine = _engine(block_dir)
    with pytest.raises(ParamError, match="exceeds the model's context") as refused:
        engine.make_sequence("r", _prompt(5), SamplingParams(max_tokens=10**12))
    assert refused.value.param == "max_tokens"


@pytest.mark.parametrize("cache", ["block", "block-dual"])
def test_block_caches_are_refused_for_full_attention_models(llada_dir, cache):
    engine = _engine(llada_dir)
    with pytest.raises(ParamError, match="block-causal models") as refused:
        engine.make_sequence("r", [5, 6, 7], SamplingParams(max_tokens=8, cache=cache))
    assert refused.value.param == "cache"


def test_block_causal_models_default_to_the_exact_block_cache_and_their_block_size(block_dir, reference):
    seq = _engine(block_dir).make_sequence("r", _prompt(5), SamplingParams(max_tokens=8))
    assert seq.params.cache == "block" and seq.params.block_length == reference.block


@pytest.mark.parametrize("schedule", [None, "auto"])
def test_block_causal_models_keep_the_even_schedule_and_let_the_policy_start_blocks(block_dir, schedule):
    """Their references spread a block's tokens evenly (SDAR) or write the first token by their own rule
    (Fast-dLLM v2), even on a server whose default is Dream's schedule and block start."""
    engine = LLMEngine(EngineConfig(
        model_dir=str(block_dir), kv_cache_memory=8 * 2**20,
        defaults=EngineDefaults(schedule="dream", block_start="first"),
    ))
    seq = engine.make_sequence("r", _prompt(5), SamplingParams(max_tokens=8, schedule=schedule, unmask="threshold"))
    assert (seq.params.schedule, seq.params.block_start) == ("llada", "confidence")


@pytest.mark.parametrize("field,value", [("schedule", "dream"), ("block_start", "first")])
def test_dreams_commit_rules_are_refused_for_block_causal_models_naming_the_field(block_dir, field, value):
    engine = _engine(block_dir)
    with pytest.raises(ParamError, match="block-causal") as refused:
        engine.make_sequence("r", _prompt(5), SamplingParams(max_tokens=8, **{field: value}))
    assert refused.value.param == field


@pytest.mark.parametrize(
    "infill", [Infill((_prompt(5), [50, 51]), (8,)), Infill((_prompt(5), [50, 51], []), (4, 4))], ids=["suffix", "gaps"]
)
def test_infill_with_fixed_text_is_refused_for_block_causal_models_naming_suffix(block_dir, infill):
    engine = _engine(block_dir)
    with pytest.raises(ParamError, match="block-causal") as refused:
        engine.make_sequence("r", infill, SamplingParams())
    assert refused.value.param == "suffix"


def test_an_infill_without_fixed_text_is_plain_generation_in_the_models_blocks(block_dir, reference):
    llm = LLM(str(block_dir))
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    infilled = llm.generate(Infill((_prompt(6), []), (10,)), params)[0]
    assert infilled.token_ids == reference.reference_decode(_prompt(6), 10, "one_per_step")
    assert infilled.token_ids == llm.generate(_prompt(6), params)[0].token_ids


def test_a_stop_string_ends_a_block_causal_request(block_dir):
    llm = LLM(str(block_dir))
    full = llm.generate(_prompt(6), SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert len(full.text) >= 4, full.text
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    cut = llm.generate(_prompt(6), SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason.value == "stop"


def test_end_of_text_ends_a_block_causal_request_mid_canvas(block_dir):
    """A token the model writes at position 7 stands in for end-of-text: the request stops there, in its block."""
    llm = LLM(str(block_dir))
    full = llm.generate(_prompt(6), SamplingParams(max_tokens=24, ignore_eos=True))[0]
    eos = full.token_ids[7]
    llm.engine.model_config = replace(llm.engine.model_config, eos_token_id=eos)
    ended = llm.generate(_prompt(6), SamplingParams(max_tokens=24))[0]
    assert ended.token_ids == full.token_ids[: full.token_ids.index(eos)]
    assert ended.finish_reason.value == "stop" and ended.stats.forward_passes < full.stats.forward_passes


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["block", "block-dual"])
def test_cuda_block_causal_decoding_matches_the_cpu_engine(block_dir, cache):
    """The Triton block-causal attention path and CUDA graphs (fp32) against the CPU engine's PyTorch references."""
    params = SamplingParams(max_tokens=21, cache=cache, unmask="threshold", threshold=0.3, ignore_eos=True)
    assert_cuda_decodes_like_the_cpu(block_dir, [_prompt(6), _prompt(16), _prompt(9, first=11)], params)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["sdar-8b", "fastdllm-v2-7b"])
def test_dummy_block_diffusion_models_of_the_real_shapes_generate_on_the_gpu(tmp_path, preset):
    assert_dummy_preset_generates(tmp_path, preset, SamplingParams(max_tokens=64, unmask="threshold", ignore_eos=True))


@pytest.mark.parametrize(
    "unmask",
    [
        {"unmask": "low_confidence", "steps": 2},
        {"unmask": "random", "temperature": 0.7, "seed": 5},
        {"unmask": "factor", "factor": 2.0, "confidence": "margin"},
        {"unmask": "threshold", "threshold": 0.5, "confidence": "entropy"},
    ],
    ids=["low_confidence-steps", "random-sampled", "factor-margin", "threshold-entropy"],
)
def test_the_block_cache_writes_what_full_recomputation_writes_under_every_unmask_policy(block_dir, unmask):
    llm = LLM(str(block_dir))
    prompts = [_prompt(6), _prompt(16), _prompt(9, first=11)]
    runs = {cache: llm.generate(prompts, [SamplingParams(max_tokens=20, cache=cache, ignore_eos=True, **unmask)] * 3)
            for cache in ("none", "block")}
    assert [o.token_ids for o in runs["block"]] == [o.token_ids for o in runs["none"]]
    assert sum(o.stats.active_positions for o in runs["block"]) < sum(o.stats.active_positions for o in runs["none"]) / 2


@pytest.mark.parametrize("prompt_len", [6, 8, 12])  # inside a sub-block, on a block edge, on a sub-block edge
@pytest.mark.parametrize("rule", ["one_per_step", "threshold"])
def test_fastdllm_v2_block_dual_decodes_like_its_reference_block_cache(tmp_path, prompt_len, rule):
    """Fast-dLLM v2's own decoding: blocks of 8 in sub-blocks of 4, each block's first token alone,
    and inside the block the sub-block recomputed over the rest of the block's K/V from its last whole step."""
    model_dir = make_random_checkpoint(tmp_path, arch="fastdllm-v2", layers=2, hidden=64, heads=4, kv_heads=2, layer_std=0.2)
    reference = QwenReference(model_dir)
    prompt = _prompt(prompt_len)
    expected = reference.reference_decode(prompt, 21, rule, threshold=0.3, block_cache=True)
    unmask = {"one_per_step": {"unmask": "low_confidence"}, "threshold": {"unmask": "threshold", "threshold": 0.3}}[rule]
    out = LLM(str(model_dir)).generate(prompt, SamplingParams(max_tokens=21, cache="block-dual", ignore_eos=True, **unmask))[0]
    assert out.token_ids == expected


def test_block_dual_is_an_approximation_whose_stale_keys_change_some_tokens(tmp_path):
    """So the test above, which matches it to its reference, checks the stale K/V and not the exact cache."""
    model_dir = make_random_checkpoint(tmp_path, arch="fastdllm-v2", layers=2, hidden=64, heads=4, kv_heads=2, layer_std=0.2)
    llm = LLM(str(model_dir))
    prompts = [_prompt(n, first) for n in (6, 8, 12) for first in (10, 11)]
    runs = {cache: [o.token_ids for o in llm.generate(prompts, [SamplingParams(max_tokens=21, cache=cache, ignore_eos=True)] * 6)]
            for cache in ("block", "block-dual")}
    assert runs["block"] != runs["block-dual"]


def test_commit_time_logprobs_on_a_block_causal_model_describe_the_greedy_tokens(block_dir):
    llm = LLM(str(block_dir))
    plain = llm.generate(_prompt(6), SamplingParams(max_tokens=10, ignore_eos=True))[0]
    out = llm.generate(_prompt(6), SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2))[0]
    assert out.token_ids == plain.token_ids
    assert [e.token_id for e in out.logprobs] == out.token_ids
    for entry in out.logprobs:  # greedy: each committed token was its step's likeliest
        assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob)) and entry.logprob <= 0


def test_prompt_scores_on_a_block_causal_model_use_its_block_causal_attention(block_dir, reference):
    """log p(x_i | x_<i, later masked) read as the model decodes: position i sees its own and earlier blocks only
    (a shifted model, Fast-dLLM v2, reads it at i - 1)."""
    prompt = _prompt(11)  # three blocks of SDAR's 4, two of Fast-dLLM v2's 8
    mask_id, shift = reference.mask_id, 1 if reference.shifted else 0
    scored = LLM(str(block_dir)).score(prompt, top_logprobs=2)[0]
    assert scored.logprobs[0] is None
    for i in range(1, len(prompt)):
        logits = reference.logits(prompt[:i] + [mask_id] * (len(prompt) - i))[i - shift]
        logits[mask_id] = float("-inf")
        logp = logits.log_softmax(-1)
        assert scored.logprobs[i].logprob == pytest.approx(float(logp[prompt[i]]), abs=FORWARD_TOLERANCE)
        assert [t for t, _ in scored.logprobs[i].top] == logp.topk(2).indices.tolist()


@pytest.mark.gpu
def test_cuda_prompt_scores_on_a_block_causal_model_agree_with_the_cpu(block_dir):
    prompt = _prompt(11)
    cpu = LLM(str(block_dir)).score(prompt, top_logprobs=2)[0]
    cuda = LLM(str(block_dir), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20).score(prompt, top_logprobs=2)[0]
    assert [e.logprob for e in cuda.logprobs[1:]] == pytest.approx([e.logprob for e in cpu.logprobs[1:]], abs=1e-3)

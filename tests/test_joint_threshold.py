"""`unmask=joint_threshold`: LLaDA2.0's threshold rule and LLaDA2.1's token editing, against a dense reference.

The reference (`llada2_reference.py`) is LLaDA2.x's generate loop over the
independent block-causal forward of `block_reference.py`; the random SDAR
checkpoints have large layer weights, so what a position predicts depends on
its context and edits happen (each editing test checks that its reference run
rewrote tokens, so it cannot pass trivially).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from block_reference import QwenReference
from llada2_reference import llada2_generate
from moe_reference import MoEReference
from server_fixtures import live_server  # noqa: F401  (pytest fixture)

from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.llm import LLM
from unmask.engine.models.make_random import make_random_checkpoint
from unmask.engine.params import EngineDefaults, ParamError, SamplingParams
from unmask.engine.policies import UNMASK_POLICIES
from unmask.engine.sequence import BlockLayout, Sequence
from unmask.server.cli import build_parser, engine_defaults

MASK, EOS = 99, 98
EDITING = {"edit_threshold": 0.05, "max_post_edit_steps": 3}


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(
        tmp_path_factory.mktemp("sdar"), arch="sdar", layers=2, hidden=64, heads=4, kv_heads=2, layer_std=0.2
    )


@pytest.fixture(scope="module")
def reference(sdar_dir) -> QwenReference:
    return QwenReference(sdar_dir)


def _prompt(n: int) -> list[int]:
    return [10, *range(40, 40 + n - 1)]


def _sequence(prompt_len: int = 4, max_tokens: int = 8, **params) -> Sequence:
    """A block-causal sequence (blocks of 4) under joint_threshold."""
    resolved = SamplingParams(max_tokens=max_tokens, block_length=4, unmask="joint_threshold", **params)
    resolved = resolved.resolve(EngineDefaults())
    editing = UNMASK_POLICIES["joint_threshold"].edits(resolved)
    return Sequence("r", list(range(1, prompt_len + 1)), resolved, MASK, EOS, seed=0, layout=BlockLayout(4), editing=editing)


# --- the rule --------------------------------------------------------------------------------


def test_joint_threshold_commits_only_confidences_strictly_above_the_threshold():
    seq = _sequence(threshold=0.5)
    chosen = UNMASK_POLICIES["joint_threshold"].choose(seq, torch.tensor([0.5, 0.2, 0.7, 0.6]))
    assert sorted(chosen.tolist()) == [2, 3]  # 0.5 is not above 0.5 (Fast-dLLM's threshold would take it)


def test_joint_threshold_commits_the_most_confident_when_none_is_above():
    seq = _sequence(threshold=0.9)
    assert UNMASK_POLICIES["joint_threshold"].choose(seq, torch.tensor([0.1, 0.4, 0.3, 0.2])).tolist() == [1]


def test_with_steps_each_step_commits_at_least_the_even_split_of_the_whole_block():
    seq = _sequence(threshold=0.5, steps=2)  # blocks of 4 over 2 steps: at least 2 per step
    chosen = UNMASK_POLICIES["joint_threshold"].choose(seq, torch.tensor([0.1, 0.8, 0.3, 0.2]))
    assert sorted(chosen.tolist()) == [1, 2]


@pytest.mark.parametrize("cache", ["block", "none"])
@pytest.mark.parametrize("prompt_len", [6, 8])  # inside a block of SDAR's 4, on its edge
@pytest.mark.parametrize("steps", [None, 2])
def test_engine_decodes_token_for_token_like_llada2s_reference_generate(sdar_dir, reference, cache, prompt_len, steps):
    prompt = _prompt(prompt_len)
    expected = llada2_generate(reference, prompt, 21, threshold=0.3, steps=steps)
    params = SamplingParams(max_tokens=21, cache=cache, unmask="joint_threshold", threshold=0.3, steps=steps, ignore_eos=True)
    out = LLM(str(sdar_dir)).generate(prompt, params)[0]
    assert out.token_ids == expected.tokens
    assert out.stats.forward_passes == expected.passes


# --- token editing ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["block", "none"])
@pytest.mark.parametrize("prompt_len", [6, 8])
@pytest.mark.parametrize("max_post_steps", [0, 3])
def test_engine_with_token_editing_decodes_token_for_token_like_llada21s_reference(
    sdar_dir, reference, cache, prompt_len, max_post_steps
):
    prompt = _prompt(prompt_len)
    expected = llada2_generate(reference, prompt, 21, threshold=0.3, edit_threshold=0.05, max_post_steps=max_post_steps)
    assert expected.edits > 0
    params = SamplingParams(
        max_tokens=21, cache=cache, unmask="joint_threshold", threshold=0.3, ignore_eos=True,
        edit_threshold=0.05, max_post_edit_steps=max_post_steps,
    )
    out = LLM(str(sdar_dir)).generate(prompt, params)[0]
    assert out.token_ids == expected.tokens
    assert out.stats.forward_passes == expected.passes


def test_llada2_with_token_editing_decodes_like_the_reference(tmp_path):
    model_dir = make_random_checkpoint(tmp_path, arch="llada2", layers=2, hidden=64, heads=4, layer_std=0.2)
    prompt = _prompt(30)  # the canvas crosses the edge of the first block of 32
    expected = llada2_generate(MoEReference(model_dir), prompt, 8, threshold=0.95, edit_threshold=0.05, max_post_steps=2)
    assert expected.edits > 0
    out = LLM(str(model_dir)).generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True, **{**EDITING, "max_post_edit_steps": 2}))[0]
    assert out.token_ids == expected.tokens


def test_logprobs_of_an_edited_request_describe_the_tokens_it_ends_with(sdar_dir):
    """Each token's logprob is from the step that last wrote it: at temperature 0 it is that step's top token."""
    params = SamplingParams(max_tokens=21, unmask="joint_threshold", threshold=0.3, ignore_eos=True, **EDITING)
    llm = LLM(str(sdar_dir))
    plain = llm.generate(_prompt(6), params)[0]
    out = llm.generate(_prompt(6), replace(params, logprobs=1))[0]
    assert out.token_ids == plain.token_ids and out.stats.tokens_committed > 21  # edits happened
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert [lp.top[0][0] for lp in out.logprobs] == out.token_ids


def test_streamed_text_is_never_revised_by_an_edit(sdar_dir):
    """Every step's token_ids are a prefix of the final ones, although edits rewrote committed tokens."""
    engine = LLMEngine(EngineConfig(model_dir=str(sdar_dir), kv_cache_memory=8 * 2**20))
    params = SamplingParams(max_tokens=21, unmask="joint_threshold", threshold=0.3, ignore_eos=True, **EDITING)
    engine.add_request("r", _prompt(6), params)
    seen = []
    while engine.has_unfinished:
        seen += [out.token_ids for out in engine.step()]
    final = seen[-1]
    assert len(final) == 21 and all(final[: len(ids)] == ids for ids in seen)
    assert len(seen) > 2 and engine.streams == {}


def test_an_edits_final_text_stops_at_the_current_blocks_start():
    seq = _sequence(prompt_len=4, max_tokens=8, **EDITING)
    seq.commit(torch.tensor([4, 5, 6, 7]), torch.tensor([10, 11, 12, 13]))  # the block is full, not yet settled
    assert seq.block == 0 and seq.committed_prefix() == []
    seq.commit(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))  # a step with no edit ends it
    assert seq.block == 1 and seq.committed_prefix() == [10, 11, 12, 13]


def test_end_of_text_in_the_current_block_ends_nothing_until_the_block_is_final():
    seq = _sequence(prompt_len=4, max_tokens=8, **EDITING)
    seq.commit(torch.tensor([4, 5, 6, 7]), torch.tensor([10, EOS, 12, 13]))
    assert not seq.hit_eos()
    seq.commit(torch.tensor([5]), torch.tensor([11]))  # the end-of-text is edited away
    seq.commit(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    seq.commit(torch.tensor([8, 9, 10, 11]), torch.tensor([EOS, 15, 16, 17]))
    assert not seq.hit_eos() and seq.committed_prefix() == [10, 11, 12, 13]
    seq.commit(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    assert seq.canvas_done and seq.hit_eos() and seq.committed_prefix() == [10, 11, 12, 13]


def test_a_block_stops_editing_after_max_post_edit_steps():
    seq = _sequence(prompt_len=4, max_tokens=8, edit_threshold=0.05, max_post_edit_steps=2)
    seq.commit(torch.tensor([4, 5, 6, 7]), torch.tensor([10, 11, 12, 13]))
    seq.commit(torch.tensor([4]), torch.tensor([20]))  # first post step, an edit
    assert seq.block == 0
    assert seq.commit(torch.tensor([4]), torch.tensor([21])).finished_block_steps == 3  # the second ends it
    assert seq.block == 1 and seq.committed_prefix() == [21, 11, 12, 13]


# --- what editing needs ------------------------------------------------------------------------


@pytest.mark.parametrize("arch, cache", [("sdar", "block-dual"), ("fastdllm-v2", "block")])
def test_editing_is_refused_where_an_edit_would_not_be_recomputed(tmp_path, arch, cache):
    model_dir = make_random_checkpoint(tmp_path, arch=arch, layers=1, hidden=32, heads=2)
    engine = LLMEngine(EngineConfig(model_dir=str(model_dir), kv_cache_memory=4 * 2**20))
    with pytest.raises(ParamError) as err:
        engine.make_sequence("r", _prompt(6), SamplingParams(max_tokens=8, cache=cache, unmask="joint_threshold", **EDITING))
    assert err.value.param == "edit_threshold"


def test_edit_threshold_is_refused_on_another_unmask_policy():
    with pytest.raises(ParamError) as err:
        SamplingParams(max_tokens=8, unmask="threshold", edit_threshold=0.5).resolve(EngineDefaults())
    assert err.value.param == "edit_threshold"


def test_the_readmes_editing_command_serves_llada2_with_editing_on(tmp_path):
    """The README's `unmask serve` line for LLaDA2.1, its model path replaced by a random LLaDA2 checkpoint."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("#### LLaDA2.x decoding and token editing") :]
    command = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["unmask", "serve"]
    args = build_parser().parse_args(argv[1:])
    model_dir = make_random_checkpoint(tmp_path, arch="llada2", layers=1, hidden=32, heads=2)
    config = EngineConfig(model_dir=str(model_dir), kv_cache_memory=4 * 2**20, defaults=engine_defaults(args))
    seq = LLMEngine(config).make_sequence("r", _prompt(6), SamplingParams(max_tokens=8))
    assert seq.editing and (seq.params.unmask, seq.params.threshold, seq.params.edit_threshold) == ("joint_threshold", 0.7, 0.5)


@pytest.mark.parametrize(
    "fields",
    [
        {"unmask": "joint_threshold", "edit_threshold": 0.5, "cache": "dkv"},  # dKV keeps K/V an edit may rewrite
        {"unmask": "threshold", "edit_threshold": 0.5},  # a parameter of another policy
        {"unmask": "joint_threshold", "edit_threshold": 1.5},
    ],
)
def test_an_editing_request_the_engine_cannot_serve_is_a_400_naming_edit_threshold(live_server, fields):
    body = {"model": live_server.model, "prompt": "The quick brown fox", "max_tokens": 8, "block_length": 8, **fields}
    with live_server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == "edit_threshold"
    with live_server.http() as http:  # the engine goes on serving
        assert http.post("/v1/completions", json={**body, "unmask": "joint_threshold", "edit_threshold": 0.5, "cache": "none"}).status_code == 200


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_an_editing_request_batched_with_one_that_does_not_edit_decodes_like_the_reference(sdar_dir, reference, device):
    """On CUDA: the block-causal kernels, fused proposals and CUDA graphs, in fp32."""
    prompts = [_prompt(6), _prompt(8)]
    editing = SamplingParams(max_tokens=21, unmask="joint_threshold", threshold=0.3, ignore_eos=True, **EDITING)
    plain = SamplingParams(max_tokens=21, unmask="joint_threshold", threshold=0.3, ignore_eos=True)
    expected = [
        llada2_generate(reference, prompts[0], 21, threshold=0.3, edit_threshold=0.05, max_post_steps=3).tokens,
        llada2_generate(reference, prompts[1], 21, threshold=0.3).tokens,
    ]
    llm = LLM(str(sdar_dir), device=device, dtype="float32", kv_cache_memory=64 * 2**20)
    assert [o.token_ids for o in llm.generate(prompts, [editing, plain])] == expected

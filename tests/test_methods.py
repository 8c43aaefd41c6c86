"""The other seed methods: dKV-Cache, dLLM-Cache, FreeCache and Guided Diffusion.

Each cache method is specified here as the set of positions it recomputes at
a step, written plainly from the sequence's state; the engine's step
statistics must match it step for step.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import unmask.engine.params as engine_params
from unmask.engine.async_engine import _fewest_steps
from unmask.engine.config import EngineConfig
from unmask.engine.engine import LLMEngine
from unmask.engine.infill import Infill
from unmask.engine.policies.guide import BUNDLED_GUIDE, guide_state, leading_agreement
from unmask.engine.llm import LLM
from unmask.engine.outputs import FinishReason
from unmask.engine.params import ParamError, SamplingParams
from unmask.engine.policies import CACHE_POLICIES, UNMASK_POLICIES
from unmask.engine.runner import SequenceWork

PROMPT = [5, 9, 13, 17, 21, 25]
TEXT = "What is 12 plus 30?"
NEW_CACHES = ("dkv", "dkv-greedy", "dllm-cache", "freecache")


@pytest.fixture(scope="session")
def guide_dir(tmp_path_factory, llada_dir) -> Path:
    """A small random Llama causal LM with the random checkpoints' tokenizer (both layouts share it)."""
    out = tmp_path_factory.mktemp("guide")
    tokenizer = AutoTokenizer.from_pretrained(str(llada_dir))
    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def make_engine(model_dir, guide_dir=None, feature_cache: bool = True, device: str = "cpu") -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_dir=str(model_dir), device=device, kv_cache_memory=8 * 2**20, feature_cache=feature_cache,
        guide_model=str(guide_dir) if guide_dir else None,
    ))


def run(engine: LLMEngine, prompts: list, params: list[SamplingParams]) -> list:
    ids = [engine.add_request(f"r{i}", p, sp).request_id for i, (p, sp) in enumerate(zip(prompts, params))]
    final = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids]


# --- the schedules, written plainly ----------------------------------------------------------------


@dataclass
class State:
    """A sequence as it stands before a step."""

    t: int  # steps taken
    step: int  # steps taken in the current block
    prompt_len: int
    length: int
    block_start: int
    block_end: int
    block_size: int
    masked: set[int]
    block_masked: set[int]
    last_committed: set[int]

    @classmethod
    def of(cls, seq) -> "State":
        start, end = seq.block_bounds()
        masked = set(torch.nonzero(seq.tokens == seq.mask_id).flatten().tolist())
        return cls(
            seq.stats.forward_passes, seq.step, seq.prompt_len, seq.length, start, end, seq.block_size,
            masked, {p for p in masked if start <= p < end}, set(seq.last_committed.tolist()),
        )


def spec(cache: str, s: State, p: SamplingParams) -> tuple[set[int], set[int], int]:
    """(positions in the forward, positions under V-verify, how many of those each layer recomputes)."""
    everything, response = set(range(s.length)), set(range(s.prompt_len, s.length))
    if cache == "dkv":
        return (everything if s.t % p.dkv_refresh == 0 else s.masked | s.last_committed), set(), 0
    if cache == "dkv-greedy":
        if s.t == 0:
            return everything, set(), 0
        if s.step == 0:
            return response, set(), 0
        w = p.dkv_window
        near = {q for m in s.block_masked for q in range(m - w, m + w + 1) if s.prompt_len <= q < s.length}
        return near | s.last_committed, set(), 0
    if cache == "freecache":
        keys = min(s.length, s.block_end + p.freecache_window * s.block_size)
        start = 0 if s.t == 0 else s.block_start - s.block_size if s.step == 0 else s.block_start
        return set(range(start, keys)), set(), 0
    assert cache == "dllm-cache"
    prompt = s.t % p.dllm_prompt_refresh == 0
    positions = everything if prompt else response
    if s.t % p.dllm_response_refresh == 0:
        return positions, set(), 0
    return positions, response, int(p.dllm_rho * len(response))


def expected_recomputed(cache: str, s: State, p: SamplingParams, shift: int) -> int:
    positions, verify, keep = spec(cache, s, p)
    positions = positions | {m - shift for m in s.block_masked}  # Dream reads position i from the output at i - 1
    return len(positions - verify) + keep


SCHEDULE_PARAMS = {
    "dkv": dict(dkv_refresh=3),
    "dkv-greedy": dict(dkv_window=1),
    "freecache": dict(freecache_window=1),
    "dllm-cache": dict(dllm_prompt_refresh=5, dllm_response_refresh=3, dllm_rho=0.3),
}


@pytest.mark.parametrize("cache", NEW_CACHES)
def test_recomputed_positions_per_step_follow_the_schedule(model_dir, cache):
    engine = make_engine(model_dir)
    params = SamplingParams(max_tokens=40, block_length=16, steps=8, cache=cache, **SCHEDULE_PARAMS[cache])
    seq = engine.add_request("r", PROMPT, params)
    seen: list[int] = []
    engine.step_listeners.append(lambda stats: seen.append(stats.active_tokens))
    expected = []
    while engine.has_unfinished:
        expected.append(expected_recomputed(cache, State.of(seq), seq.params, engine.model_config.logits_shift))
        engine.step()
    assert seen == expected
    assert seq.stats.active_positions == sum(expected)
    assert sum(seen) < len(seen) * seq.length  # the saving is real: the reference recomputes everything
    assert engine.pool.num_free == engine.pool.num_pages


@pytest.mark.gpu
def test_every_method_batched_on_the_gpu_follows_its_schedule(model_dir, guide_dir):
    """The Triton kernels under the same schedules: all methods in one batch, with guided decoding."""
    engine = make_engine(model_dir, guide_dir, device="cuda")
    seqs = {
        cache: engine.add_request(cache, PROMPT, SamplingParams(
            max_tokens=40, block_length=16, steps=8, cache=cache, unmask=unmask, **SCHEDULE_PARAMS[cache]
        ))
        for cache, unmask in zip(NEW_CACHES, ("low_confidence", "guided", "threshold", "guided"))
    }
    seen: list[int] = []
    engine.step_listeners.append(lambda stats: seen.append(stats.active_tokens))
    while engine.has_unfinished:
        running = [(c, s) for c, s in seqs.items() if not s.is_finished]
        expected = sum(expected_recomputed(c, State.of(s), s.params, engine.model_config.logits_shift) for c, s in running)
        engine.step()
        assert seen[-1] == expected
    assert all(s.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for s in seqs.values())
    assert engine.pool.num_free == engine.pool.num_pages


# --- exactness of the mechanism --------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["dkv", "dkv-greedy", "dllm-cache"])
def test_the_first_step_is_a_full_refresh_equal_to_the_reference_step(model_dir, cache):
    firsts = {}
    for policy in ("none", cache):
        engine = make_engine(model_dir)
        seq = engine.add_request("r", PROMPT, SamplingParams(max_tokens=32, block_length=16, cache=policy, seed=3))
        engine.step()
        firsts[policy] = seq.tokens.clone()
    assert torch.equal(firsts[cache], firsts["none"])


@pytest.mark.parametrize("window", [0, 1, 5])
def test_freecache_attends_to_its_window_only(model_dir, window):
    """The first step equals a dense forward of the sequence cut after the window's last block."""
    engine = make_engine(model_dir)
    seq = engine.add_request("r", PROMPT, SamplingParams(max_tokens=48, block_length=16, cache="freecache", freecache_window=window))
    engine.scheduler.admit()
    policy = CACHE_POLICIES["freecache"]
    sources = seq.masked_in_block() - engine.model_config.logits_shift
    work = SequenceWork(seq, policy.active_positions(seq), sources, policy.key_length(seq))
    logits = engine.runner.run([work])
    cut = min(seq.length, seq.prompt_len + 16 * (window + 1))
    assert work.key_length == cut and work.positions.tolist() == list(range(cut))
    dense = engine.loaded.model.forward_dense(seq.tokens[None, :cut])[0]
    torch.testing.assert_close(logits, dense[work.logit_positions], rtol=1e-4, atol=1e-4)


def test_dllm_cache_recomputing_everything_through_v_verify_equals_no_cache(model_dir):
    """Kp = 1 and rho = 1: every layer verifies the response and keeps all of it, so nothing is stale."""
    prompts = [TEXT, "Hello world"]
    engine = make_engine(model_dir)
    plain = run(engine, prompts, [SamplingParams(max_tokens=32, block_length=16, seed=4, temperature=0.7)] * 2)
    full = SamplingParams(
        max_tokens=32, block_length=16, seed=4, temperature=0.7, cache="dllm-cache",
        dllm_prompt_refresh=1, dllm_response_refresh=1000, dllm_rho=1.0,
    )
    reused = run(engine, prompts, [full] * 2)
    assert [o.token_ids for o in reused] == [o.token_ids for o in plain]


def test_dllm_cache_without_recompute_reuses_the_cached_features_exactly(llada_dir):
    """rho = 0 right after a refresh: every layer adds its cached outputs, so the logits of the
    positions still masked are the refresh step's. (LLaDA layout: Dream reads a position from
    its left neighbour, whose input may have just changed.)"""
    engine = make_engine(llada_dir)
    logits = []
    run_model = engine.runner.run
    engine.runner.run = lambda work: logits.append(run_model(work)) or logits[-1]
    params = SamplingParams(
        max_tokens=32, block_length=16, steps=8, cache="dllm-cache",
        dllm_prompt_refresh=100, dllm_response_refresh=100, dllm_rho=0.0,
    )
    seq = engine.add_request("r", PROMPT, params)
    engine.step()
    before = set(seq.masked_in_block().tolist())
    engine.step()
    first = dict(zip(range(seq.prompt_len, seq.prompt_len + 16), logits[0]))
    still = sorted(before)
    torch.testing.assert_close(logits[1], torch.stack([first[p] for p in still]), rtol=1e-5, atol=1e-5)


# --- batching ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cache,unmask",
    [("dkv", "low_confidence"), ("dkv-greedy", "random"), ("dllm-cache", "threshold"), ("freecache", "guided"), ("dual", "guided")],
)
def test_each_method_gives_the_same_output_alone_or_batched_with_other_policies(model_dir, guide_dir, cache, unmask):
    engine = make_engine(model_dir, guide_dir)
    target = SamplingParams(max_tokens=40, block_length=16, steps=8, cache=cache, unmask=unmask, seed=11, temperature=0.5, threshold=0.5)
    (alone,) = run(engine, [TEXT], [target])
    others = [
        ("Hello world, how are you today?", SamplingParams(max_tokens=24, block_length=8, cache="dual", unmask="factor")),
        ("Sort: apple, banana", SamplingParams(max_tokens=40, block_length=16, cache="dllm-cache", unmask="guided", temperature=1.0, seed=3)),
        ("The quick brown fox", SamplingParams(max_tokens=17, block_length=16, cache="freecache", unmask="threshold", threshold=0.5)),
        ("Once upon a time", SamplingParams(max_tokens=32, block_length=16, cache="dkv", unmask="random", seed=5)),
    ]
    outs = run(engine, [TEXT] + [p for p, _ in others], [target] + [s for _, s in others])
    assert outs[0].token_ids == alone.token_ids
    assert outs[0].stats.forward_passes == alone.stats.forward_passes
    assert all(o.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for o in outs)
    assert engine.pool.num_free == engine.pool.num_pages


# --- guided -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _biased(*heads: tuple[torch.nn.Module, int]):
    """Make each LM head predict its token everywhere, confidently, inside the block."""
    def hook_for(token: int):
        def hook(_module, _inputs, out):
            out = out.clone()
            out[..., token] += 50.0
            return out
        return hook
    handles = [module.register_forward_hook(hook_for(token)) for module, token in heads]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_guided_commits_the_whole_agreed_run_in_one_step(model_dir, guide_dir):
    engine = make_engine(model_dir, guide_dir)
    token = int(engine.tokenizer.encode(" fox", add_special_tokens=False)[0])
    with _biased((engine.loaded.model.lm_head, token), (engine.resources.guide.model.lm_head, token)):
        (out,) = run(engine, [PROMPT], [SamplingParams(max_tokens=40, block_length=16, unmask="guided")])
    assert out.token_ids == [token] * 40
    assert out.stats.steps_per_block == [1, 1, 1]  # a block per step: both models agree on every draft


def test_where_the_guide_rejects_a_draft_it_commits_its_own_token(model_dir, guide_dir):
    engine = make_engine(model_dir, guide_dir)
    model_token, guide_token = (int(engine.tokenizer.encode(w, add_special_tokens=False)[0]) for w in (" fox", " dog"))
    with _biased((engine.loaded.model.lm_head, model_token), (engine.resources.guide.model.lm_head, guide_token)):
        (out,) = run(engine, [PROMPT], [SamplingParams(max_tokens=40, block_length=16, unmask="guided")])
    assert out.token_ids == [guide_token] * 40  # every first draft rejected and replaced by the guide's token
    assert out.stats.steps_per_block == [16, 16, 8]


def test_a_guide_that_prefers_the_mask_token_never_commits_it(model_dir, guide_dir):
    engine = make_engine(model_dir, guide_dir)
    mask = engine.model_config.mask_token_id
    with _biased((engine.resources.guide.model.lm_head, mask)):
        (out,) = run(engine, [PROMPT], [SamplingParams(max_tokens=24, block_length=8, unmask="guided")])
    assert len(out.token_ids) == 24 and mask not in out.token_ids
    assert all(t < engine.model_config.vocab_size for t in out.token_ids)


def test_guided_writes_left_to_right_at_least_one_token_per_step(model_dir, guide_dir):
    engine = make_engine(model_dir, guide_dir)
    seq = engine.add_request("r", PROMPT, SamplingParams(max_tokens=32, block_length=16, unmask="guided"))
    while engine.has_unfinished:
        masked_before = seq.masked_in_block()
        engine.step()
        n = seq.last_committed.numel()
        assert n >= 1 and torch.equal(seq.last_committed, masked_before[:n])  # the leftmost masks of the block


def test_the_guide_keeps_its_kv_so_a_step_feeds_it_only_new_tokens(model_dir, guide_dir):
    """Each step feeds the last committed token and the drafts but the last; only the first feeds the prompt."""
    engine = make_engine(model_dir, guide_dir)
    seq = engine.add_request("r", PROMPT, SamplingParams(max_tokens=32, block_length=16, unmask="guided"))
    fed = []
    while engine.has_unfinished:
        masks = seq.masked_in_block().numel()
        first = seq.stats.forward_passes == 0
        before = engine.resources.guide.tokens_fed
        engine.step()
        fed.append(engine.resources.guide.tokens_fed - before)
        assert fed[-1] == (len(PROMPT) + masks - 1 if first else masks)


def test_batched_guide_verification_equals_one_request_at_a_time(model_dir, guide_dir):
    engine = make_engine(model_dir, guide_dir)
    params = SamplingParams(max_tokens=24, block_length=8, unmask="guided")
    seqs = [engine.add_request(f"r{i}", PROMPT[: 2 + 2 * i], params) for i in range(3)]
    for _ in range(3):  # the guide now holds a different length for each
        engine.step()
    drafts = [torch.randint(0, 400, (s.masked_in_block().numel(),), generator=torch.Generator().manual_seed(i)) for i, s in enumerate(seqs)]
    alone = []
    for seq, d in zip(seqs, drafts):
        copy_ = copy.deepcopy(seq)
        engine.resources.guide.verify([(copy_, d)])
        alone.append(guide_state(copy_))
    engine.resources.guide.verify(list(zip(seqs, drafts)))
    for seq, single in zip(seqs, alone):
        batched = guide_state(seq)
        assert (batched.agreed, batched.correction, batched.length) == (single.agreed, single.correction, single.length)
        for (k1, v1), (k2, v2) in zip(batched.kv, single.kv):
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)


def test_the_agreement_rule_is_top_two_within_the_relative_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.2, 0.3], [0.6, 0.4, 0.0]]))
    assert leading_agreement(logits, torch.tensor([0, 1, 2, 1]), relative=0.5) == 4
    assert leading_agreement(logits, torch.tensor([0, 2, 2, 1]), relative=0.5) == 1  # not in the top two
    assert leading_agreement(logits, torch.tensor([1, 0, 0, 0]), relative=0.7) == 0  # 0.3 < 0.7 * 0.5
    assert leading_agreement(logits[:1], torch.tensor([600]), relative=0.5) == 0  # past the guide's vocabulary
    padded = torch.tensor([True, True, False, True])
    assert leading_agreement(logits, torch.tensor([0, 1, 2, 1]), relative=0.5, valid=padded) == 2


# --- parameters and refusals -----------------------------------------------------------------------


def test_the_policy_names_a_request_may_choose_are_exactly_the_implemented_ones():
    assert tuple(CACHE_POLICIES) == engine_params.CACHE_POLICIES
    assert tuple(UNMASK_POLICIES) == engine_params.UNMASK_POLICIES


@pytest.mark.parametrize("field,value,cache,unmask", [
    ("dkv_refresh", 0, "dkv", None), ("dkv_window", -1, "dkv-greedy", None),
    ("dllm_prompt_refresh", 0, "dllm-cache", None), ("dllm_response_refresh", 0, "dllm-cache", None),
    ("dllm_rho", 1.5, "dllm-cache", None), ("freecache_window", -1, "freecache", None),
    ("guide_relative", 0.0, None, "guided"), ("guide_relative", 1.5, None, "guided"),
])
def test_bad_method_parameters_name_the_field(llada_dir, guide_dir, field, value, cache, unmask):
    engine = make_engine(llada_dir, guide_dir)
    with pytest.raises(ParamError) as info:
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=16, cache=cache, unmask=unmask, **{field: value}))
    assert info.value.param == field


@pytest.mark.parametrize("field,value,cache,unmask", [
    ("dkv_refresh", 4, "dual", None), ("dllm_rho", 0.5, "dkv", None), ("freecache_window", 2, None, None),
    ("guide_relative", 0.5, None, "threshold"),
])
def test_a_method_parameter_on_another_method_is_refused(llada_dir, field, value, cache, unmask):
    engine = make_engine(llada_dir)
    with pytest.raises(ParamError) as info:
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=16, cache=cache, unmask=unmask, **{field: value}))
    assert info.value.param == field and field in info.value.message


def test_dllm_cache_needs_the_feature_pages(llada_dir):
    engine = make_engine(llada_dir, feature_cache=False)
    with pytest.raises(ParamError) as info:
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=16, cache="dllm-cache"))
    assert info.value.param == "cache" and "feature_cache" in info.value.message


def test_guided_needs_a_guide_model(llada_dir):
    engine = make_engine(llada_dir)  # the bundled guide does not share the random checkpoint's tokenizer
    with pytest.raises(ParamError) as info:
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=16, unmask="guided"))
    assert info.value.param == "unmask"


# --- fewest steps (the drain deadline's lower bound) -----------------------------------------------

# 20 tokens in blocks of 8 at 4 steps a block: the short last block of 4 keeps the rate (2 steps).
FEWEST_STEPS_REQUEST = dict(max_tokens=20, block_length=8, steps=4, ignore_eos=True, seed=3)


def steps_taken(engine: LLMEngine, unmask: str) -> tuple[int, int]:
    """A request's denoising steps as run, and its unmask policy's `fewest_steps` for it."""
    params = SamplingParams(unmask=unmask, **FEWEST_STEPS_REQUEST)
    out = run(engine, [PROMPT], [params])[0]
    return out.stats.forward_passes, UNMASK_POLICIES[unmask].fewest_steps(params.resolve(engine.config.defaults))


@pytest.mark.parametrize("unmask", ["low_confidence", "random"])
def test_a_fixed_step_policys_fewest_steps_are_exactly_the_steps_it_takes(llada_dir, unmask):
    taken, fewest = steps_taken(make_engine(llada_dir), unmask)
    assert taken == fewest == 2 * 4 + 2


def test_an_infill_canvas_with_a_block_of_fixed_text_may_finish_before_its_policys_fewest_steps(llada_dir):
    """Its fixed block takes no step, so the drain deadline's lower bound for such a request is one step."""
    engine = make_engine(llada_dir)
    middle = [7, 11, 15, 19, 23, 27, 31, 35]  # the canvas's second block of 8: nothing to write
    params = SamplingParams(block_length=8, steps=4, ignore_eos=True, seed=3)
    seq = engine.add_request("r", Infill((PROMPT, middle, []), (8, 8)), params)
    bound = _fewest_steps(seq)
    while engine.has_unfinished:
        engine.step()
    assert seq.stats.forward_passes == 2 * 4 < UNMASK_POLICIES[seq.params.unmask].fewest_steps(seq.params)
    assert bound == 1


@pytest.mark.parametrize("unmask", ["threshold", "factor", "guided"])
def test_an_adaptive_policy_never_takes_fewer_steps_than_its_fewest_steps(llada_dir, guide_dir, unmask):
    taken, fewest = steps_taken(make_engine(llada_dir, guide_dir), unmask)
    assert fewest == 3 and taken >= fewest  # one step per block at least


# --- the bundled model ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", NEW_CACHES)
def test_each_cache_runs_on_the_bundled_model(bundled_model_dir, cache):
    llm = LLM(str(bundled_model_dir), kv_cache_memory=64 * 2**20, feature_cache=True)
    out = llm.chat([{"role": "user", "content": "What is 12 plus 30?"}], SamplingParams(max_tokens=32, block_length=16, cache=cache))
    assert out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


def test_guided_runs_on_the_bundled_model_with_the_bundled_guide(bundled_model_dir):
    if not (BUNDLED_GUIDE / "config.json").is_file():
        pytest.skip("the bundled guide models/unmask-tiny-guide is not in this checkout")
    llm = LLM(str(bundled_model_dir))
    out = llm.chat([{"role": "user", "content": "What is 12 plus 30?"}], SamplingParams(max_tokens=32, block_length=16, unmask="guided"))
    assert out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert out.stats.tokens_per_step >= 1.0

"""Infilling: the canvas between fixed text, its suffix fixed and attended, one gap or several.

Decoding is compared token for token with `decoding_reference.dense_decode` (the
whole sequence prompt | canvas | suffix run densely at every step) on random
checkpoints made contextual, at temperature 0.
"""

from __future__ import annotations

import pytest
import torch

from decoding_reference import contextual_checkpoint, dense_decode
from server_fixtures import live_server  # noqa: F401  (pytest fixture)
from unmask.engine.infill import Infill
from unmask.engine.llm import LLM
from unmask.engine.models import load_model
from unmask.engine.params import ParamError, SamplingParams

PROMPT = "What is 12 plus 30?"
SUFFIX = " The answer is 42. Sort: apple, banana."


@pytest.fixture(scope="module", params=["llada", "dream"])
def llm(request, tmp_path_factory) -> LLM:
    return LLM(str(contextual_checkpoint(tmp_path_factory.mktemp(f"{request.param}-ctx"), request.param)))


def encode(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(text, add_special_tokens=False)


def schedule_of(llm: LLM) -> str:
    return "dream" if llm.engine.model_config.arch == "dream" else "llada"


def run_to_end(llm: LLM, prompt, params: SamplingParams):
    """Run one request through the engine; return its sequence (tokens included) and final output."""
    seq = llm.engine.add_request("infill", prompt, params)
    final = None
    while llm.engine.has_unfinished:
        for out in llm.engine.step():
            final = out if out.finished else final
    return seq, final


@pytest.mark.parametrize("span,block_length,steps", [(16, 16, 16), (24, 8, 4), (20, 16, 8)])
def test_suffix_infill_equals_the_dense_reference(llm, span, block_length, steps):
    mask = llm.engine.model_config.mask_token_id
    expected = dense_decode(
        llm.engine.loaded, encode(llm, PROMPT), [mask] * span, encode(llm, SUFFIX),
        block_length=block_length, steps=steps, schedule=schedule_of(llm),
    )
    params = SamplingParams(block_length=block_length, steps=steps, ignore_eos=True)
    out = llm.generate(Infill((PROMPT, SUFFIX), (span,)), params)[0]
    assert out.token_ids == expected.canvas
    assert out.stats.forward_passes == expected.passes


def test_the_suffix_is_never_rewritten(llm):
    seq, out = run_to_end(llm, Infill((PROMPT, SUFFIX), (16,)), SamplingParams(ignore_eos=True))
    assert seq.tokens[seq.canvas_end :].tolist() == encode(llm, SUFFIX)
    assert out.finish_reason.value == "length" and len(out.token_ids) == 16


def test_the_suffix_is_attended(llm):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    with_suffix = llm.generate(Infill((PROMPT, SUFFIX), (16,)), params)[0].token_ids
    without = llm.generate(PROMPT, params)[0].token_ids
    assert with_suffix != without


def test_several_gaps_in_one_request_equal_the_dense_reference(llm):
    pieces = [PROMPT, " The answer is", ". Sort:", ""]
    spans = [6, 5, 7]
    mask = llm.engine.model_config.mask_token_id
    canvas = [mask] * 6 + encode(llm, pieces[1]) + [mask] * 5 + encode(llm, pieces[2]) + [mask] * 7
    expected = dense_decode(
        llm.engine.loaded, encode(llm, PROMPT), canvas, block_length=8, steps=8, schedule=schedule_of(llm)
    )
    result = llm.infill(pieces, spans, SamplingParams(block_length=8, steps=8))
    assert result.output.token_ids == expected.canvas
    starts = [0, 6 + len(encode(llm, pieces[1])), len(canvas) - 7]
    eos = llm.engine.model_config.eos_token_id
    for text, start, n in zip(result.texts, starts, spans):
        ids = expected.canvas[start : start + n]
        assert text == llm.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)


def test_fixed_tokens_inside_the_canvas_are_never_rewritten(llm):
    seq, _ = run_to_end(llm, Infill((PROMPT, " The answer is", SUFFIX), (5, 5)), SamplingParams(ignore_eos=True))
    middle = encode(llm, " The answer is")
    assert seq.tokens[seq.prompt_len + 5 : seq.prompt_len + 5 + len(middle)].tolist() == middle


@pytest.mark.parametrize("cache", ["prefix", "dual", "dkv", "dkv-greedy"])
def test_caches_that_recompute_the_suffix_accept_infill(llm, cache):
    seq, out = run_to_end(llm, Infill((PROMPT, SUFFIX), (16,)), SamplingParams(cache=cache, block_length=8))
    assert out.error is None and seq.tokens[seq.canvas_end :].tolist() == encode(llm, SUFFIX)


@pytest.mark.parametrize("kind,method", [("cache", "freecache"), ("unmask", "guided")])
def test_methods_that_assume_the_canvas_ends_the_sequence_refuse_infill(llm, kind, method):
    with pytest.raises(ParamError) as refused:
        llm.engine.make_sequence("r", Infill((PROMPT, SUFFIX), (8,)), SamplingParams(**{kind: method}))
    assert refused.value.param == kind and "suffix" in refused.value.message


def test_an_empty_suffix_is_plain_generation(llm):
    params = SamplingParams(max_tokens=12, cache="freecache", ignore_eos=True)
    assert llm.generate(Infill((PROMPT, ""), (12,)), params)[0].token_ids == llm.generate(PROMPT, params)[0].token_ids


def test_infill_counts_the_suffix_in_the_context(llm):
    context = llm.engine.max_model_len
    with pytest.raises(ParamError) as refused:
        llm.engine.make_sequence("r", Infill((PROMPT, SUFFIX), (context - 8,)), SamplingParams())
    assert refused.value.param == "max_tokens" and "suffix" in refused.value.message


def test_a_mask_token_in_the_suffix_is_refused(llm):
    mask = llm.engine.model_config.mask_token_id
    with pytest.raises(ParamError) as refused:
        llm.engine.make_sequence("r", Infill((encode(llm, PROMPT), [5, mask]), (8,)), SamplingParams())
    assert refused.value.param == "suffix"


def test_a_suffix_infill_gives_each_canvas_token_its_commit_time_logprob(llm):
    infill = Infill((PROMPT, SUFFIX), (8,))
    plain = llm.generate(infill, SamplingParams(ignore_eos=True))[0]
    out = llm.generate(infill, SamplingParams(ignore_eos=True, logprobs=2))[0]
    assert out.token_ids == plain.token_ids
    assert [e.token_id for e in out.logprobs] == out.token_ids
    for entry in out.logprobs:  # greedy: each committed token was its step's likeliest
        assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob))


def test_logprobs_are_refused_for_an_infill_of_several_spans(llm):
    with pytest.raises(ParamError, match="more than one span") as refused:
        llm.engine.make_sequence("r", Infill((PROMPT, " The answer is", ""), (4, 4)), SamplingParams(logprobs=1))
    assert refused.value.param == "logprobs"


# --- over HTTP ------------------------------------------------------------------------------------


def test_completions_with_suffix_answer_the_canvas_text(live_server):
    body = {"model": live_server.model, "prompt": PROMPT, "suffix": SUFFIX, "max_tokens": 8, "ignore_eos": True}
    with live_server.http() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    offline = LLM(live_server.engine._engine.config.model_dir)
    expected = offline.generate(Infill((PROMPT, SUFFIX), (8,)), SamplingParams(ignore_eos=True))[0]
    assert response.json()["choices"][0]["text"] == expected.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_completions_with_suffix_refuse_freecache_with_a_400(live_server):
    body = {"model": live_server.model, "prompt": PROMPT, "suffix": SUFFIX, "max_tokens": 8, "cache": "freecache"}
    with live_server.http() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "cache" and "suffix" in error["message"]


def test_an_end_of_text_in_one_span_does_not_end_a_request_with_more_spans(llm):
    eos = llm.engine.model_config.eos_token_id
    seq = llm.engine.make_sequence("r", Infill((PROMPT, " The answer is", ""), (4, 4)), SamplingParams())
    seq.commit(torch.tensor([seq.prompt_len]), torch.tensor([eos]))  # the first span's first token: end-of-text
    assert not seq.hit_eos()
    plain = llm.engine.make_sequence("p", PROMPT, SamplingParams(max_tokens=4))
    plain.commit(torch.tensor([plain.prompt_len]), torch.tensor([eos]))
    assert plain.hit_eos()


@pytest.mark.gpu
def test_cuda_infill_equals_the_dense_reference(tmp_path):
    path = contextual_checkpoint(tmp_path / "dream", "dream")
    llm = LLM(str(path), device="cuda", dtype="float32", kv_cache_memory=64 * 2**20)
    reference = load_model(path, dtype="float32", device="cpu")
    mask = reference.config.mask_token_id
    expected = dense_decode(
        reference, encode(llm, PROMPT), [mask] * 24, encode(llm, SUFFIX), block_length=8, steps=8, schedule="dream"
    )
    out = llm.generate(Infill((PROMPT, SUFFIX), (24,)), SamplingParams(block_length=8, steps=8, ignore_eos=True))[0]
    assert out.token_ids == expected.canvas


def test_completions_with_suffix_and_echo_score_the_prompt_and_infill_the_canvas(live_server):
    body = {"model": live_server.model, "prompt": PROMPT, "suffix": SUFFIX, "max_tokens": 6, "ignore_eos": True}
    with live_server.http() as client:
        scored = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 1})
        plain = client.post("/v1/completions", json=body)
    assert scored.status_code == 200, scored.text
    choice, canvas_text = scored.json()["choices"][0], plain.json()["choices"][0]["text"]
    assert choice["text"] == PROMPT + canvas_text  # the suffix is not echoed, as in OpenAI's insert mode
    offline = LLM(live_server.engine._engine.config.model_dir)
    prompt_scores = offline.score(PROMPT, top_logprobs=1)[0]
    generated = offline.generate(Infill((PROMPT, SUFFIX), (6,)), SamplingParams(ignore_eos=True, logprobs=1))[0]
    expected = [None] + [e.logprob for e in prompt_scores.logprobs[1:]] + [e.logprob for e in generated.logprobs]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)

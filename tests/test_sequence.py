"""`Sequence`: its blocks, its commits and its own step counters."""

from __future__ import annotations

import pytest
import torch

from unmask.engine.outputs import FinishReason, TokenLogprob
from unmask.engine.params import EngineDefaults, SamplingParams
from unmask.engine.sequence import BlockLayout, Sequence, SequenceStatus

MASK, EOS = 99, 98


def make_sequence(max_tokens: int = 8, block_length: int = 4, prompt: tuple[int, ...] = (1, 2, 3)) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, block_length=block_length).resolve(EngineDefaults())
    return Sequence("r", list(prompt), params, MASK, EOS, seed=0)


def make_block_causal_sequence(layout: BlockLayout, max_tokens: int, prompt_len: int) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, block_length=layout.block_size).resolve(EngineDefaults())
    return Sequence("r", list(range(1, prompt_len + 1)), params, MASK, EOS, seed=0, layout=layout)


def test_a_new_sequence_is_its_prompt_then_a_masked_canvas():
    seq = make_sequence()
    assert seq.tokens.tolist() == [1, 2, 3] + [MASK] * 8
    assert (seq.block, seq.step, seq.steps_taken) == (0, 0, 0)
    assert seq.masked_in_block().tolist() == [3, 4, 5, 6]


def test_commit_writes_the_tokens_and_advances_the_clocks():
    seq = make_sequence()
    commit = seq.commit(torch.tensor([4, 6]), torch.tensor([10, 11]))
    assert seq.tokens[3:7].tolist() == [MASK, 10, MASK, 11]
    assert (commit.tokens, commit.finished_block_steps) == (2, None)
    assert (seq.block, seq.step, seq.steps_taken) == (0, 1, 1)
    assert seq.last_committed.tolist() == [4, 6]
    assert seq.masked_in_block().tolist() == [3, 5]


def test_commit_keeps_the_logprobs_of_the_committed_tokens_by_position():
    seq = make_sequence()
    first, second = TokenLogprob(10, -0.5, [(10, -0.5)]), TokenLogprob(11, -1.5, [(12, -1.0)])
    seq.commit(torch.tensor([4, 6]), torch.tensor([10, 11]), [first, second])
    seq.commit(torch.tensor([3]), torch.tensor([12]))  # a step that recorded none
    assert seq.token_logprobs == {4: first, 6: second}


def test_the_commit_that_unmasks_a_block_moves_to_the_next_block():
    seq = make_sequence()
    seq.commit(torch.tensor([3, 4]), torch.tensor([10, 11]))
    commit = seq.commit(torch.tensor([5, 6]), torch.tensor([12, 13]))
    assert commit.finished_block_steps == 2
    assert (seq.block, seq.step, seq.steps_taken, seq.last_block) == (1, 0, 2, 0)
    assert seq.stats.steps_per_block == [2]
    assert seq.masked_in_block().tolist() == [7, 8, 9, 10]


def test_the_canvas_is_done_after_its_last_block():
    seq = make_sequence(max_tokens=6, block_length=4)  # blocks of 4 and 2
    seq.commit(torch.tensor([3, 4, 5, 6]), torch.tensor([10, 11, 12, 13]))
    assert not seq.canvas_done
    seq.commit(torch.tensor([7, 8]), torch.tensor([14, 15]))
    assert seq.canvas_done and seq.stats.steps_per_block == [1, 1]


def test_commits_are_counted_in_the_request_stats():
    seq = make_sequence()
    seq.record_work(11)
    seq.commit(torch.tensor([3]), torch.tensor([10]))
    assert (seq.stats.forward_passes, seq.stats.tokens_committed, seq.stats.active_positions) == (1, 1, 11)


def test_committed_prefix_stops_at_the_first_mask_and_at_end_of_text():
    seq = make_sequence()
    seq.commit(torch.tensor([3, 4, 6]), torch.tensor([10, EOS, 12]))
    assert seq.committed_prefix() == [10]
    assert seq.hit_eos()


def test_admit_and_release_hand_the_pages_over():
    seq = make_sequence()
    seq.admit([4, 5])
    assert seq.status is SequenceStatus.RUNNING and seq.pages == [4, 5]
    assert seq.release() == [4, 5]
    assert seq.pages == [] and seq.is_finished


def test_finish_keeps_the_first_error():
    seq = make_sequence()
    seq.finish(FinishReason.ERROR, "ValueError: bad")
    seq.finish(FinishReason.ERROR)
    assert (seq.finish_reason, seq.error) == (FinishReason.ERROR, "ValueError: bad")


def test_a_block_causal_canvas_runs_to_the_end_of_its_last_block_in_blocks_counted_from_position_0():
    seq = make_block_causal_sequence(BlockLayout(4), max_tokens=6, prompt_len=3)  # prompt + 6 = 9 -> 12
    assert seq.length == 12 and seq.num_blocks == 3
    assert [seq.block_bounds(b) for b in range(3)] == [(3, 4), (4, 8), (8, 12)]
    assert seq.masked_in_block().tolist() == [3]


def test_committing_a_sub_block_leaves_the_block_open_until_its_last_mask():
    seq = make_block_causal_sequence(BlockLayout(4, sub_block_size=2), max_tokens=4, prompt_len=4)
    assert seq.masked_in_block().tolist() == [4, 5]
    assert seq.commit(torch.tensor([4, 5]), torch.tensor([10, 11])).finished_block_steps is None
    assert seq.block == 0 and seq.masked_in_block().tolist() == [6, 7]
    assert seq.commit(torch.tensor([6, 7]), torch.tensor([12, 13])).finished_block_steps == 2
    assert seq.canvas_done


def test_a_blocks_first_token_is_committed_alone_when_the_layout_says_so():
    seq = make_block_causal_sequence(BlockLayout(4, first_token_alone=True), max_tokens=4, prompt_len=4)
    assert seq.entering_block() and seq.masked_in_block().tolist() == [4]
    seq.commit(torch.tensor([4]), torch.tensor([10]))
    assert not seq.entering_block() and seq.masked_in_block().tolist() == [5, 6, 7]


def test_only_max_tokens_of_a_padded_canvas_count_as_output():
    seq = make_block_causal_sequence(BlockLayout(4), max_tokens=2, prompt_len=4)  # canvas [4, 8), output [4, 6)
    seq.commit(torch.tensor([4, 5, 6, 7]), torch.tensor([10, 11, 12, 13]))
    assert seq.committed_prefix() == [10, 11]


def test_an_infill_canvas_lies_between_prompt_and_suffix_and_its_written_blocks_are_skipped():
    params = SamplingParams(max_tokens=12, block_length=4).resolve(EngineDefaults())
    canvas = [MASK] * 4 + [7, 8, 9, 10] + [MASK] * 4  # the second block holds only fixed text
    seq = Sequence("r", [1, 2, 3], params, MASK, EOS, seed=0, canvas_ids=canvas, suffix_ids=[5, 6])
    assert seq.tokens.tolist() == [1, 2, 3] + canvas + [5, 6] and seq.canvas_end == 15
    seq.commit(torch.tensor([3, 4, 5, 6]), torch.tensor([20, 21, 22, 23]))
    assert seq.block == 2 and seq.block_bounds() == (11, 15)
    assert seq.stats.steps_per_block == [1, 0]


def test_a_block_causal_sequence_takes_no_infill_canvas_or_suffix():
    params = SamplingParams(max_tokens=4, block_length=4).resolve(EngineDefaults())
    with pytest.raises(ValueError, match="block-causal"):
        Sequence("r", [1, 2, 3], params, MASK, EOS, seed=0, layout=BlockLayout(4), suffix_ids=[5, 6])

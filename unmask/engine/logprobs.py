"""Commit-time log-probabilities: each generated token's score at the step that committed it.

A diffusion LM has no left-to-right factorisation of its output; what it does have, for
every committed token, is the distribution it was drawn from: the model's softmax at that
position in the step that committed it, given everything committed (and still masked)
then. That is what a request with `SamplingParams.logprobs` gets, with the step's
likeliest alternatives.
"""

from __future__ import annotations

import torch

from unmask.engine.outputs import TokenLogprob
from unmask.engine.runner import SequenceWork
from unmask.engine.sequence import Sequence


def record_commit_logprobs(work: SequenceWork, logits_shift: int) -> None:
    """Store the logprobs of the tokens the step just committed (`seq.last_committed`) on the sequence.

    The step's logit rows are the block's masked positions at proposal time, in order
    (a shifted model reads position i from row i - 1, in the same order).
    """
    rows_info = work.row_logprobs
    if rows_info is None:
        return
    seq = work.seq
    targets = work.logit_positions + logits_shift
    rows = torch.searchsorted(targets, seq.last_committed)
    for position, row in zip(seq.last_committed.tolist(), rows.tolist()):
        seq.token_logprobs[position] = TokenLogprob(
            token_id=int(seq.tokens[position]),
            logprob=float(rows_info.proposed[row]),
            top=list(zip(rows_info.top_ids[row].tolist(), rows_info.top_logprobs[row].tolist())),
        )


def output_logprobs(seq: Sequence, num_tokens: int) -> list[TokenLogprob] | None:
    """The logprobs of the output's `num_tokens` tokens, and of the end-of-text token after them if it ended the request."""
    if seq.params.logprobs is None:
        return None
    count = num_tokens + (1 if seq.hit_eos() else 0)
    return [seq.token_logprobs[seq.prompt_len + i] for i in range(count)]

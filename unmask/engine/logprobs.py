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
from unmask.engine.sampling import RowLogprobs
from unmask.engine.sequence import Sequence


def chosen_logprobs(rows: RowLogprobs | None, chosen: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprob] | None:
    """The logprobs of the proposals a step commits: rows `chosen` of the step's rows, whose tokens are `tokens`.

    None when the step recorded none (the request did not ask for them).
    """
    if rows is None:
        return None
    return [
        TokenLogprob(
            token_id=token,
            logprob=float(rows.proposed[row]),
            top=list(zip(rows.top_ids[row].tolist(), rows.top_logprobs[row].tolist())),
        )
        for row, token in zip(chosen.tolist(), tokens.tolist())
    ]


def output_logprobs(seq: Sequence, num_tokens: int) -> list[TokenLogprob] | None:
    """The logprobs of the output's `num_tokens` tokens, and of the end-of-text token after them if it ended the request."""
    if seq.params.logprobs is None:
        return None
    count = num_tokens + (1 if seq.hit_eos() else 0)
    return [seq.token_logprobs[seq.prompt_len + i] for i in range(count)]

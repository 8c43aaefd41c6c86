"""Prompt log-likelihoods for a diffusion LM: each token scored given only the tokens before it.

A client that sends `echo` + `logprobs` (lm-eval's loglikelihood requests) sums the
scores of a continuation's tokens without saying where the context ends, so a token's
score may depend only on the tokens before it. The estimator is

    log p(x_i | x_<i, positions i .. L-1 masked)

for every position i >= 1 of a prompt of L tokens: the prompt with its suffix from i
replaced by mask tokens, read at position i (a shifted model, Dream, reads it from the
output at i - 1). A masked diffusion model defines this conditional exactly (it is
the first step of decoding x_i.. from the prefix x_<i with L - i masks), so it needs no
sampling and no Monte-Carlo error. The mask token is excluded from the softmax, as it
is from every proposal.

Cost: L - 1 forward passes over L positions each, i.e. (L - 1) x L token positions, quadratic
in the prompt length (plain next-token scoring is one pass of L). They are batched a few
rows at a time (`max_tokens` positions per chunk, each row attending over the whole
prompt with the model's attention pattern: bidirectional, or block-causal for SDAR and
Fast-dLLM v2, whose position i then sees only its own and earlier blocks), and the engine runs one chunk between denoising steps, so scoring
never stalls generation for long; `EngineConfig.max_score_tokens` caps L.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unmask.engine.models.config import ModelConfig
from unmask.engine.models.transformer import DenseAttention, block_causal_mask
from unmask.engine.outputs import PromptScores, TokenLogprob


@dataclass
class ScoringJob:
    """The scores of one prompt, computed a chunk of positions at a time (`run_chunk`).

    `scores[i]` is position i's score; position 0 has no prefix and stays None.
    """

    request_id: str
    token_ids: list[int]
    top_k: int  # likeliest alternatives recorded per position
    scores: list[TokenLogprob | None] = field(default_factory=lambda: [None])

    @property
    def done(self) -> bool:
        return len(self.scores) >= len(self.token_ids)

    def result(self) -> PromptScores:
        return PromptScores(self.token_ids, self.scores)

    @torch.inference_mode()
    def run_chunk(self, model: torch.nn.Module, config: ModelConfig, device: torch.device, max_tokens: int) -> None:
        """Score the next positions, as many as fit `max_tokens` packed positions (at least one)."""
        length = len(self.token_ids)
        first = len(self.scores)
        count = min(length - first, max(1, max_tokens // length))
        positions = torch.arange(first, first + count)
        rows = masked_suffixes(torch.tensor(self.token_ids), positions, config.mask_token_id)
        logp = suffix_logprobs(model, config, rows.to(device), positions.to(device))
        targets = torch.tensor(self.token_ids)[positions]
        chosen = logp.gather(-1, targets[:, None].to(device)).squeeze(-1).cpu()
        top = logp.topk(self.top_k, dim=-1)
        for r in range(count):
            self.scores.append(
                TokenLogprob(
                    token_id=int(targets[r]),
                    logprob=float(chosen[r]),
                    top=list(zip(top.indices[r].tolist(), top.values[r].tolist())),
                )
            )


def masked_suffixes(token_ids: torch.Tensor, positions: torch.Tensor, mask_id: int) -> torch.Tensor:
    """[len(positions), L]: row r is the prompt with every position from positions[r] on masked."""
    columns = torch.arange(token_ids.numel())
    rows = token_ids.expand(positions.numel(), -1).clone()
    rows[columns[None, :] >= positions[:, None]] = mask_id
    return rows


def suffix_logprobs(model: torch.nn.Module, config: ModelConfig, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Log-softmax [R, V] (float32, mask token at -inf) at position positions[r] of row r.

    Rows attend with the model's own pattern: a block-causal model's positions see only
    their own and earlier blocks (from position 0), as when it decodes.
    """
    count, length = rows.shape
    flat_positions = torch.arange(length, device=rows.device).repeat(count)
    block = config.attention_block_size
    mask = None if block is None else block_causal_mask(length, block, rows.device)[None, None]
    hidden = model(rows.reshape(-1), flat_positions, DenseAttention(count, length, mask))
    read = torch.arange(count, device=rows.device) * length + positions - config.logits_shift
    logits = model.compute_logits(hidden[read]).float()
    logits[:, config.mask_token_id] = float("-inf")
    return logits.log_softmax(-1)

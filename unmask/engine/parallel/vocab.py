"""Proposals from vocabulary-split logits, without gathering them.

Each rank holds the logits of its token rows only ([N, V / tp]). For every
row it reduces its shard to four numbers (`ShardStats`): its best key and the
token id and logit behind it, and the log-sum-exp of its logits. The key is
the logit itself for greedy rows and the Gumbel-max key l / T + g for sampled
ones (argmax over the whole vocabulary of l / T + g draws from softmax(l / T),
and the argmax of a union is the best of the shards' argmaxes). Gathering
[tp, N, 4] numbers then gives, on every rank:

    token      = the token of the rank with the best key (the lowest rank on ties,
                 so greedy decoding breaks ties like an argmax over the full row)
    confidence = exp(logit[token] - logsumexp over ranks of the shards' lse)

which is the `prob` confidence: softmax(l)[token]. The Gumbel noise is
`kernels.noise`, keyed by (row key, global token id) as on a single device, so
the draw depends neither on how the vocabulary is split nor on the batch, and
a tensor-parallel run samples the single-device run's tokens (up to fp32
rounding of near-tied keys: the ranks sum their partial products in another order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.engine.parallel.layers import VocabShard
from unmask.kernels.noise import gumbel_keys

# Rows are reduced in chunks of about this many logits, which bounds the fp32/fp64 temporaries.
_CHUNK_ELEMENTS = 2**26


@dataclass
class ShardStats:
    """What one rank contributes per logit row."""

    key: torch.Tensor  # float32 [N] the best key in the shard
    token: torch.Tensor  # int64 [N] its global token id
    logit: torch.Tensor  # float32 [N] its un-noised logit
    lse: torch.Tensor  # float32 [N] log-sum-exp of the shard's logits

    def pack(self) -> torch.Tensor:
        """[N, 4] float64 (token ids are exact in float64 below 2^53)."""
        return torch.stack([self.key.double(), self.token.double(), self.logit.double(), self.lse.double()], dim=-1)


def blank_columns(logits: torch.Tensor, shard: VocabShard, mask_id: int) -> None:
    """Make the mask token and the shard's padding rows unpickable (-inf), in place."""
    logits[:, shard.valid :] = float("-inf")
    row = shard.local(mask_id)
    if row is not None:
        logits[:, row] = float("-inf")


def shard_stats(logits: torch.Tensor, shard: VocabShard, temperature: torch.Tensor, seeds: torch.Tensor) -> ShardStats:
    """Reduce a shard's logits [N, size] to its `ShardStats`; rows with temperature > 0 are sampled."""
    step = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[1]))
    parts = [
        _chunk_stats(logits[i : i + step], shard, temperature[i : i + step], seeds[i : i + step])
        for i in range(0, max(1, logits.shape[0]), step)
    ]
    return ShardStats(*(torch.cat([getattr(p, name) for p in parts]) for name in ("key", "token", "logit", "lse")))


def _chunk_stats(logits: torch.Tensor, shard: VocabShard, temperature: torch.Tensor, seeds: torch.Tensor) -> ShardStats:
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    logit, index = x.max(dim=-1)
    key = logit.clone()
    sampled = (temperature > 0).nonzero().flatten()
    if sampled.numel():
        keys = gumbel_keys(x[sampled], temperature[sampled], seeds[sampled], first_token=shard.start)
        key[sampled], index[sampled] = keys.max(dim=-1)
        logit[sampled] = x[sampled].gather(1, index[sampled, None]).squeeze(1)
    return ShardStats(key, index + shard.start, logit, lse)


def combine_stats(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's packed stats [tp, N, 4] -> (token ids int64 [N], confidence float32 [N])."""
    key, token, logit, lse = gathered.unbind(-1)
    best = key.argmax(dim=0, keepdim=True)  # the first maximum: the lowest rank wins a tie
    total = torch.logsumexp(lse, dim=0)
    chosen_logit = logit.gather(0, best).squeeze(0)
    return token.gather(0, best).squeeze(0).long(), torch.exp(chosen_logit - total).float()

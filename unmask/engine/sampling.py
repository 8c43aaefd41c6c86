"""From logits to proposals: the token each masked position would take, and how sure the model is.

Follows LLaDA: with temperature T > 0 the proposal is the
Gumbel-max sample argmax(l / T - log(-log u)) — the same ordering as LLaDA's
exp(l) / (-log u)^T, computed without overflow — while the confidence is read
from the softmax of the un-noised logits. Dream's `margin` and `entropy`
confidences are offered beside `prob`.

All randomness of a request comes from its own generator, one seed per step;
the Gumbel noise of a row is `kernels.noise` of that seed, the row's position
and each token id, on every path (the fused kernel, its reference, the
general path below, the tensor-parallel reduction). So a request samples the
same tokens alone or in a batch, on CPU or GPU, with any confidence kind, and
with or without tensor parallelism (up to fp32 rounding of near-tied keys).
The common case (`prob` confidence, no top-k/top-p/min-p filter, no logprobs) goes through one fused kernel
for the whole step; the step then makes one host transfer of the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from unmask.engine.params import SamplingParams
from unmask.engine.transfer import to_device, to_host
from unmask.kernels import fused_confidence
from unmask.kernels.noise import SEED_BITS, gumbel_keys, row_keys


@dataclass
class RowGroup:
    """The logit rows of one sequence in a step (consecutive, in group order)."""

    params: SamplingParams
    generator: torch.Generator  # the request's CPU generator
    positions: torch.Tensor  # the sequence position of each row (CPU, int64)
    random_confidence: bool = False
    logprobs: RowLogprobs | None = None  # filled by the proposal when the request asks for logprobs

    @property
    def rows(self) -> int:
        return self.positions.numel()


@dataclass
class RowLogprobs:
    """The model's log-probabilities at one sequence's logit rows of a step (CPU tensors).

    Read from the un-noised, unfiltered softmax (temperature 1, no top-k/top-p/min-p),
    the mask token excluded: the distribution the model itself assigns.
    """

    proposed: torch.Tensor  # float32 [rows]: log p of the token proposed at each row
    top_ids: torch.Tensor  # int64 [rows, k]: the k likeliest tokens, best first
    top_logprobs: torch.Tensor  # float32 [rows, k]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest nucleus of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest set to -inf (ties at the k-th are kept)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Logits of tokens less likely than min_p x the likeliest token set to -inf."""
    if min_p <= 0.0:
        return logits
    floor = logits.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p, dtype=logits.dtype))
    return logits.masked_fill(logits < floor, float("-inf"))


def sampling_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The logits a sample is drawn from: top-k and min-p first, then top-p over what they keep (as vLLM)."""
    return top_p_filter(min_p_filter(top_k_filter(logits, params.top_k), params.min_p), params.top_p)


def row_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> RowLogprobs:
    """The log-probability of each row's token and the row's k likeliest tokens, on the CPU."""
    logp = logits.float().log_softmax(-1)
    top = logp.topk(k, dim=-1)
    return RowLogprobs(
        proposed=logp.gather(-1, tokens[:, None]).squeeze(-1).cpu(),
        top_ids=top.indices.cpu(),
        top_logprobs=top.values.cpu(),
    )


@dataclass
class RowInputs:
    """The per-row sampling inputs of one step's logit rows (one seed drawn per request)."""

    seeds: list[int]  # one per group
    fused: torch.Tensor  # bool [N]: rows of the fused path (`uses_fused_path`)
    temperature: torch.Tensor  # float32 [N]
    row_seeds: torch.Tensor  # int64 [N] each row's noise key (`noise.row_keys` of its step seed and position)

    @cached_property
    def general_rows(self) -> torch.Tensor:
        """Rows outside the fused path, ascending: they need their full distribution (computed once per step)."""
        return (~self.fused).nonzero().flatten()


def uses_fused_path(params: SamplingParams) -> bool:
    """The fused kernel samples from the whole distribution and keeps no logprobs."""
    filtered = params.top_p < 1.0 or params.top_k > 0 or params.min_p > 0.0
    return params.confidence == "prob" and not filtered and params.logprobs is None


def row_inputs(groups: list[RowGroup]) -> RowInputs:
    """Draw this step's seed of every group and spread the groups' settings over their rows."""
    seeds = [int(torch.randint(2**SEED_BITS, (1,), generator=g.generator)) for g in groups]
    rows = torch.tensor([g.rows for g in groups], dtype=torch.long)
    # Per group, spread over its rows without a Python loop over rows (a step has thousands).
    return RowInputs(
        seeds,
        fused=torch.tensor([uses_fused_path(g.params) for g in groups], dtype=torch.bool).repeat_interleave(rows),
        temperature=torch.tensor([g.params.temperature for g in groups], dtype=torch.float32).repeat_interleave(rows),
        row_seeds=row_keys(torch.tensor(seeds, dtype=torch.long).repeat_interleave(rows), torch.cat([g.positions for g in groups])),
    )


def propose_batch(logits: torch.Tensor, groups: list[RowGroup], mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] of all masked positions of a step -> (token ids [N], confidence [N]) on the CPU."""
    logits[:, mask_id] = float("-inf")  # a committed token must never be the mask itself
    inputs = row_inputs(groups)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    confidence = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    fused = inputs.fused.nonzero().flatten()
    if fused.numel():
        temperature = to_device(inputs.temperature[fused], logits.device)
        seeds = to_device(inputs.row_seeds[fused], logits.device)
        if fused.numel() == logits.shape[0]:  # the common case: every row, no gather copy
            tokens, confidence = fused_confidence(logits, temperature, seeds)
        else:
            index = to_device(fused, logits.device)
            tokens[index], confidence[index] = fused_confidence(logits[index], temperature, seeds)
    general = inputs.general_rows
    general_logits = logits[to_device(general, logits.device)] if general.numel() else None
    return complete_proposals(tokens, confidence, general_logits, inputs, groups)


def complete_proposals(
    tokens: torch.Tensor,
    confidence: torch.Tensor,
    general_logits: torch.Tensor | None,
    inputs: RowInputs,
    groups: list[RowGroup],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the rows outside the fused path from their full logits (`general_logits`, those rows
    in order), bring the proposals to the CPU and apply `random` remasking."""
    if general_logits is not None:
        index = to_device(inputs.general_rows, tokens.device)
        tokens[index], confidence[index] = _propose_general_groups(general_logits, groups, inputs.seeds)
    tokens, confidence = to_host(tokens, confidence)  # the step's one wait for the GPU
    _randomize_confidence(confidence, groups, inputs.seeds)
    return tokens, confidence


def _propose_general_groups(
    logits: torch.Tensor, groups: list[RowGroup], seeds: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposals of the groups outside the fused path; `logits` holds just their rows, in group order."""
    tokens, confidence, start = [], [], 0
    for group, seed in zip(groups, seeds):
        if uses_fused_path(group.params):
            continue
        rows = logits[start : start + group.rows]
        keys = row_keys(torch.full((group.rows,), seed, dtype=torch.long), group.positions).to(logits.device)
        t, c = _propose_general(rows, group.params, keys)
        if group.params.logprobs is not None:
            group.logprobs = row_logprobs(rows, t, group.params.logprobs)
        start += group.rows
        tokens.append(t)
        confidence.append(c.float())
    return torch.cat(tokens), torch.cat(confidence)


def _randomize_confidence(confidence: torch.Tensor, groups: list[RowGroup], seeds: list[int]) -> None:
    """LLaDA's `random` remasking ranks positions by uniform noise instead of confidence."""
    start = 0
    for group, seed in zip(groups, seeds):
        if group.random_confidence:
            noise = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
            confidence[start : start + group.rows] = torch.rand(group.rows, generator=noise)
        start += group.rows


def _propose_general(logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any confidence kind, top-k, top-p and min-p, in plain PyTorch (the rows' noise `keys`, as the fused kernel's)."""
    probs = logits.float().softmax(-1)
    if params.temperature > 0:
        filtered = sampling_filter(logits.float(), params)
        temperature = torch.full((filtered.shape[0],), params.temperature, device=logits.device)
        tokens = gumbel_keys(filtered, temperature, keys).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    return tokens, _confidence(probs, tokens, params.confidence or "prob")


def _confidence(probs: torch.Tensor, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "prob":
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # negative entropy: higher is surer
    raise ValueError(f"unknown confidence kind {kind!r}")

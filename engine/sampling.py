"""From logits to proposals: the token each masked position would take, and how sure the model is.

Follows LLaDA (ALGORITHMS.md): with temperature T > 0 the proposal is the
Gumbel-max sample argmax(l - T log(-log u)) — the same ordering as LLaDA's
exp(l) / (-log u)^T, computed without overflow — while the confidence is read
from the softmax of the un-noised logits. Dream's `margin` and `entropy`
confidences are offered beside `prob`.

All randomness of a request comes from its own generator, one seed per step,
so a request samples the same tokens whether it runs alone or in a batch.
The common case (`prob` confidence, no top-p) goes through one fused kernel
for the whole step; the step then makes one host transfer of the results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.params import SamplingParams
from kernels import fused_confidence

_SEED_RANGE = 2**62


@dataclass
class RowGroup:
    """The logit rows of one sequence in a step (consecutive, in group order)."""

    params: SamplingParams
    generator: torch.Generator  # the request's CPU generator
    rows: int
    random_confidence: bool = False


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest nucleus of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def propose_batch(logits: torch.Tensor, groups: list[RowGroup], mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] of all masked positions of a step -> (token ids [N], confidence [N]) on the CPU."""
    logits[:, mask_id] = float("-inf")  # a committed token must never be the mask itself
    seeds = [int(torch.randint(_SEED_RANGE, (1,), generator=g.generator)) for g in groups]
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    confidence = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    fast_rows, temps, row_seeds = [], [], []
    start = 0
    for group, seed in zip(groups, seeds):
        rows = slice(start, start + group.rows)
        start += group.rows
        p = group.params
        if p.confidence == "prob" and p.top_p >= 1.0:
            fast_rows.append(torch.arange(rows.start, rows.stop))
            temps += [p.temperature] * group.rows
            row_seeds += [seed + i for i in range(group.rows)]
        else:
            tokens[rows], confidence[rows] = _propose_general(logits[rows], p, seed)
    if fast_rows:
        temperature = torch.tensor(temps, dtype=torch.float32, device=logits.device)
        seed_tensor = torch.tensor(row_seeds, dtype=torch.long, device=logits.device)
        if len(temps) == logits.shape[0]:  # the common case: every row, no gather copy
            tokens, confidence = fused_confidence(logits, temperature, seed_tensor)
        else:
            index = torch.cat(fast_rows).to(logits.device)
            tokens[index], confidence[index] = fused_confidence(logits[index], temperature, seed_tensor)
    tokens, confidence = tokens.cpu(), confidence.cpu()
    _randomize_confidence(confidence, groups, seeds)
    return tokens, confidence


def _randomize_confidence(confidence: torch.Tensor, groups: list[RowGroup], seeds: list[int]) -> None:
    """LLaDA's `random` remasking ranks positions by uniform noise instead of confidence."""
    start = 0
    for group, seed in zip(groups, seeds):
        if group.random_confidence:
            noise = torch.Generator().manual_seed(seed ^ 0x5DEECE66D)
            confidence[start : start + group.rows] = torch.rand(group.rows, generator=noise)
        start += group.rows


def _propose_general(logits: torch.Tensor, params: SamplingParams, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Any confidence kind and top-p, in plain PyTorch (float64 Gumbel noise)."""
    probs = logits.float().softmax(-1)
    if params.temperature > 0:
        filtered = top_p_filter(logits.float(), params.top_p).double()
        generator = torch.Generator(device=logits.device).manual_seed(seed)
        u = torch.rand(filtered.shape, generator=generator, dtype=torch.float64, device=logits.device)
        u = u.clamp_min(torch.finfo(torch.float64).tiny)
        tokens = (filtered - params.temperature * torch.log(-torch.log(u))).argmax(-1)
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

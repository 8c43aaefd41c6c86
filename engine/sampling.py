"""From logits to proposals: the token each masked position would take, and how sure the model is.

Follows LLaDA (ALGORITHMS.md): with temperature T > 0 the proposal is the
Gumbel-max sample argmax(l - T log(-log u)) — the same ordering as LLaDA's
exp(l) / (-log u)^T, computed in float64 without overflow — while the
confidence is read from the softmax of the un-noised logits. Dream's
`margin` and `entropy` confidences are offered as alternatives to `prob`.
"""

from __future__ import annotations

import torch

from engine.params import SamplingParams


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the smallest nucleus of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - ordered.softmax(-1) >= top_p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def propose(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    mask_id: int,
    random_confidence: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] of the masked positions -> (proposed token ids [n], confidence [n])."""
    logits = logits.float().clone()
    logits[:, mask_id] = float("-inf")  # a committed token must never be the mask itself
    probs = logits.softmax(-1)
    if params.temperature > 0:
        filtered = top_p_filter(logits, params.top_p).double()
        u = torch.rand(filtered.shape, generator=generator, dtype=torch.float64, device=generator.device)
        u = u.clamp_min(torch.finfo(torch.float64).tiny)
        tokens = (filtered - params.temperature * torch.log(-torch.log(u))).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    if random_confidence:
        return tokens, torch.rand(tokens.shape, generator=generator, device=generator.device).to(probs.device)
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

"""References computed directly from dense forwards (no engine code): each position's logits, and the prompt-scoring estimator."""

from __future__ import annotations

from pathlib import Path

import torch

from unmask.engine.models import load_model


def dense_logits(model, cfg, x: torch.Tensor) -> torch.Tensor:
    """Each position's logits from one dense forward of `x` [L] (a shifted model, Dream, reads position i
    from the output at i - 1), the mask token never proposed."""
    logits = model.forward_dense(x[None])[0]
    if cfg.logits_shift:
        logits = torch.cat([logits[:1], logits[:-1]])
    logits[:, cfg.mask_token_id] = float("-inf")
    return logits


@torch.no_grad()
def masked_suffix_logprobs(model_dir: Path, prompt: list[int], top: int = 0) -> list[tuple[float, list[int]]]:
    """For each i >= 1: log p(prompt[i]) and the `top` likeliest ids, from a dense forward of the prompt with
    positions i.. masked, read at position i (a shifted model, Dream: at i - 1), the mask token excluded."""
    loaded = load_model(model_dir)
    cfg = loaded.config
    scores = []
    for i in range(1, len(prompt)):
        x = torch.tensor(prompt[:i] + [cfg.mask_token_id] * (len(prompt) - i))
        logits = loaded.model.forward_dense(x[None])[0, i - cfg.logits_shift]
        logits[cfg.mask_token_id] = float("-inf")
        logp = logits.log_softmax(-1)
        scores.append((float(logp[prompt[i]]), logp.topk(top).indices.tolist()))
    return scores

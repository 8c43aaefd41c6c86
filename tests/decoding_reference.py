"""Independent references for the decoding tests: dense forwards, no pages, no cache, written from the papers' code.

`contextual_checkpoint` makes a random checkpoint whose predictions depend on
context: as `make_random` writes them, the transformer blocks barely move the
embeddings, so every masked position predicts the same token and a decoding
test could not tell one commit order from another. Scaling the blocks' weights
fixes that.

`dense_decode` is blockwise masked diffusion over a sequence prompt | canvas |
suffix, where the canvas may hold fixed tokens (infill) and the suffix is never
written: each step runs the whole sequence, reads position i's prediction from
output i (LLaDA) or i - 1 (Dream), and commits by one of the reference rules:

- schedule `llada` (LLaDA's `get_num_transfer_tokens`): the block's masked
  tokens spread evenly over its steps, earlier steps taking the remainder;
- schedule `dream` (Dream's `diffusion_generate`, per block as Fast-dLLM):
  timesteps linspace(1, eps, steps + 1) in float32, int(n (1 - s / t)) of the
  n masked tokens at step i, everything at the last step;
- `threshold` (Fast-dLLM): every token with confidence >= tau, at least the top one;
- `first_rule` (Fast-dLLM's Dream block code): at a block's first step, only the
  block's first position, from that step's shifted logits.

Confidences as Dream's `sample_tokens` at temperature 0: `prob` the top
probability, `margin` top-1 minus top-2, `entropy` sum p log(p + 1e-10). The mask
token is never proposed (the engine's rule; a random model might predict it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unmask.engine.models import load_model
from unmask.engine.models.checkpoint import save_checkpoint
from unmask.engine.models.make_random import make_random_checkpoint

CONTEXT_SCALE = 25.0  # block weights x25: per-position predictions differ (checked in the tests)


def contextual_checkpoint(out_dir: Path, arch: str, seed: int = 0) -> Path:
    kv_heads = 2 if arch == "dream" else None
    path = make_random_checkpoint(out_dir, arch=arch, seed=seed, layers=2, hidden=64, heads=4, kv_heads=kv_heads)
    model = load_model(path, dtype="float32", device="cpu").model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers" in name and not name.endswith("norm.weight"):
                p.mul_(CONTEXT_SCALE)
    save_checkpoint(model, path, dtype=torch.float32)
    return path


@dataclass
class Decoded:
    canvas: list[int]  # the finished canvas, fixed tokens included
    passes: int  # forward passes (steps) taken
    commits: list[int]  # tokens committed at each step
    order: list[list[int]]  # the positions committed at each step, ascending


def confidences(logits: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    probs = logits.softmax(-1)
    top, x0 = probs.max(-1)
    if kind == "prob":
        return top, x0
    if kind == "margin":
        two = probs.topk(2, dim=-1).values
        return two[:, 0] - two[:, 1], x0
    if kind == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1), x0
    raise ValueError(kind)


def dream_count(masked: int, i: int, steps: int, eps: float) -> int:
    if i == steps - 1:
        return masked
    timesteps = torch.linspace(1, eps, steps + 1)
    num_mask_token = torch.tensor([masked]).sum() / 1  # the reference's mask_index.sum() / batch: float32
    return int(num_mask_token * (1 - timesteps[i + 1] / timesteps[i]))


def dense_decode(
    loaded,
    prompt: list[int],
    canvas: list[int],
    suffix: list[int] = (),
    *,
    block_length: int,
    steps: int | None = None,
    schedule: str = "llada",
    confidence: str = "prob",
    eps: float = 1e-3,
    threshold: float | None = None,
    first_rule: bool = False,
) -> Decoded:
    cfg, model = loaded.config, loaded.model
    x = torch.tensor(list(prompt) + list(canvas) + list(suffix))
    p, n = len(prompt), len(canvas)
    passes, commits, order = 0, [], []
    for start in range(p, p + n, block_length):
        end = min(start + block_length, p + n)
        block_masks = int((x[start:end] == cfg.mask_token_id).sum())
        if block_masks == 0:
            continue
        block_steps = max(1, -(-(end - start) * (steps or block_length) // block_length))
        base, extra = divmod(block_masks, block_steps)
        i = 0
        while bool((x[start:end] == cfg.mask_token_id).any()):
            logits = model.forward_dense(x[None])[0]
            if cfg.logits_shift:
                logits = torch.cat([logits[:1], logits[:-1]])
            logits[:, cfg.mask_token_id] = float("-inf")
            conf, x0 = confidences(logits, confidence)
            masked = torch.nonzero(x[start:end] == cfg.mask_token_id).flatten() + start
            if first_rule and i == 0 and int(masked[0]) == start:
                chosen = masked[:1]
            elif threshold is not None:
                ranked = masked[torch.argsort(conf[masked], descending=True, stable=True)]
                chosen = torch.cat([ranked[:1], ranked[1:][conf[ranked[1:]] >= threshold]])
            else:
                if i >= block_steps - 1:
                    k = masked.numel()
                elif schedule == "dream":
                    k = dream_count(masked.numel(), i, block_steps, eps)
                else:
                    k = base + (1 if i < extra else 0)
                chosen = masked[torch.topk(conf[masked], k).indices] if k else masked[:0]
            x[chosen] = x0[chosen]
            passes += 1
            commits.append(chosen.numel())
            order.append(sorted(chosen.tolist()))
            i += 1
    return Decoded(x[p : p + n].tolist(), passes, commits, order)


def distinct_predictions(loaded, prompt: list[int], length: int) -> int:
    """How many different tokens the model proposes for `length` masked positions after `prompt`."""
    cfg = loaded.config
    x = torch.tensor(list(prompt) + [cfg.mask_token_id] * length)
    logits = loaded.model.forward_dense(x[None])[0]
    start = len(prompt) - cfg.logits_shift
    return len(set(logits[start : start + length].argmax(-1).tolist()))


def commit_order(llm, prompt, params) -> list[list[int]]:
    """The positions the engine (`llm.engine`) commits at each step of one request, ascending."""
    seq = llm.engine.add_request("order", prompt, params)
    order = []
    while llm.engine.has_unfinished:
        llm.engine.step()
        order.append(sorted(seq.last_committed.tolist()))
    return order

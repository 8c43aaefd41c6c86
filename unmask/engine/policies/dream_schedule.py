"""Dream's timestep schedule: how many of a block's masked tokens each step commits.

Dream's `diffusion_generate` walks the timesteps `linspace(1, eps, steps + 1)`
(float32); at step i, with t = timesteps[i], s = timesteps[i + 1] and n tokens
still masked, it commits `int(n * (1 - s / t))` of them, and all that remain at
the last step. For 64 tokens in 64 steps that is 0, 1, 1, ..., 1, 2: nothing at
the first step, one extra at the last. Fast-dLLM's Dream code applies the same
rule inside each block (with the block's masked tokens and steps), which is what
this module computes; with one block covering the canvas it is Dream's own.
"""

from __future__ import annotations

import torch


def dream_transfer_count(masked: int, step: int, steps: int, eps: float) -> int:
    """Tokens committed at `step` (0-based) of `steps` while `masked` remain, in the reference's float32."""
    if step >= steps - 1:
        return masked
    timesteps = torch.linspace(1, eps, steps + 1)
    t, s = timesteps[step], timesteps[step + 1]
    # The reference divides the mask count by the batch size, which makes it a float32 tensor.
    return int(torch.tensor(float(masked)) * (1 - s / t))

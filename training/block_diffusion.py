"""Block-diffusion training (SDAR's objective) for `train_tiny.py --arch sdar`.

A block-causal model sees, while it denoises block b, the clean blocks before
b and block b partly masked. One forward trains every block of a row at once
with the row written twice, noisy then clean (positions repeated):

- a noisy token sees the noisy tokens of its own block (bidirectional) and
  the clean tokens of the earlier blocks of its example;
- a clean token sees the clean tokens of its own and earlier blocks (what
  the engine's exact block cache holds);
- nothing sees the noisy copy from the clean one.

Blocks are counted from each example's position 0, as the engine decodes
them. The loss is the weighted cross-entropy on the masked noisy tokens
(`noise_batch`'s weights), as in the full-attention objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.tasks.batches import PackedBatch
from training.trainer import autocast
from unmask.engine.models.transformer import DenseAttention


@dataclass
class TwinRows:
    """Packed rows written twice (noisy, then clean) with the block-diffusion visibility."""

    input_ids: torch.Tensor  # [B, 2L]
    positions: torch.Tensor  # [B, 2L]
    attention: torch.Tensor  # [B, 1, 2L, 2L] bool, True = attend


def twin_rows(batch: PackedBatch, noisy_ids: torch.Tensor, block_size: int) -> TwinRows:
    block = batch.positions // block_size
    same = batch.same_segment()[:, 0]
    same_block = same & (block[:, :, None] == block[:, None, :])
    earlier = same & (block[:, None, :] < block[:, :, None])
    noisy_rows = torch.cat((same_block, earlier), dim=2)  # keys: noisy half, clean half
    clean_rows = torch.cat((torch.zeros_like(same), same_block | earlier), dim=2)
    return TwinRows(
        input_ids=torch.cat((noisy_ids, batch.input_ids), dim=1),
        positions=torch.cat((batch.positions, batch.positions), dim=1),
        attention=torch.cat((noisy_rows, clean_rows), dim=1)[:, None],
    )


def block_diffusion_loss(
    model: torch.nn.Module, batch: PackedBatch, noisy_ids: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted CE on the masked noisy tokens (summed per example, averaged) and the argmax accuracy on masked answers."""
    rows = twin_rows(batch, noisy_ids, block_size)
    b, length = batch.input_ids.shape
    hidden = model(rows.input_ids.reshape(-1), rows.positions.reshape(-1), DenseAttention(b, 2 * length, rows.attention))
    logits = model.compute_logits(hidden.view(b, 2 * length, -1)[:, :length]).reshape(b * length, -1)
    targets = batch.input_ids.reshape(-1)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = (ce * weight.reshape(-1)).sum() / batch.num_examples
    scored = (masked & batch.answer).reshape(-1)
    hits = (logits.argmax(dim=-1) == targets) & scored
    return loss, hits.sum() / scored.sum().clamp_min(1)


@torch.no_grad()
def block_reference_generate(model: torch.nn.Module, prompts: list[list[int]], gen_length: int) -> list[list[int]]:
    """The block-causal reference decoding, greedy, one token per step, full forward every step (no cache).

    Each row's blocks count from its position 0 (the first one holds the
    prompt's tail) and its canvas runs to the end of its last block; each step
    commits the most confident masked token of each row's current block.
    Returns each row's first `gen_length` canvas tokens.
    """
    cfg = model.cfg
    size = cfg.attention_block_size
    device = next(model.parameters()).device
    b = len(prompts)
    ends = torch.tensor([-(-(len(p) + gen_length) // size) * size for p in prompts], device=device)
    length = int(ends.max())
    x = torch.full((b, length), cfg.eos_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p, device=device)
        x[i, len(p) : int(ends[i])] = cfg.mask_token_id
    pos = torch.arange(length, device=device)
    block_of = pos // size
    visible = (block_of[None, :] <= block_of[:, None])[None] & (pos[None, None, :] < ends[:, None, None])
    attention = DenseAttention(b, length, visible[:, None])
    rows = torch.arange(b, device=device)
    while True:
        masked = x == cfg.mask_token_id
        if not masked.any():
            break
        current = torch.where(masked, block_of[None, :], length).min(dim=1).values  # each row's first masked block
        with autocast(device):
            hidden = model(x.reshape(-1), pos.repeat(b), attention).view(b, length, -1)
            logits = model.compute_logits(hidden).float()
        logits[..., cfg.mask_token_id] = float("-inf")
        confidence, proposal = logits.softmax(-1).max(-1)
        eligible = masked & (block_of[None, :] == current[:, None])
        j = confidence.masked_fill(~eligible, -1.0).argmax(dim=1)
        active = eligible.any(dim=1)
        x[rows[active], j[active]] = proposal[rows[active], j[active]]
    return [x[i, len(p) : len(p) + gen_length].tolist() for i, p in enumerate(prompts)]

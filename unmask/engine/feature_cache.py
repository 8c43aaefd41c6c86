"""dLLM-Cache's per-layer feature reuse: V-verify picks the tokens each layer recomputes.

dLLM-Cache (arXiv 2506.06295) keeps, for every token and layer, the attention
output and the FFN output; the pool holds them in its feature pages, at the
same slots as the K/V. A sequence that uses them (`FeatureUse`) puts all the
positions it may need into the forward, and at every layer:

1. V is computed for its *verified* positions (the response, at a partial
   step) and compared, by cosine similarity, with the V cached in the pool.
   The `keep` least similar positions are recomputed at this layer; every
   verified position's cached V is replaced by the fresh one (as the paper
   does: V costs one projection, K and the rest of the layer do not).
2. The recomputed positions, together with every position not under
   verification (other sequences of the batch, a refreshed prompt), run
   attention and the FFN; the others add their cached outputs to the
   residual stream instead.
3. The recomputed positions' outputs are written to the feature pages, so a
   refresh step (nothing verified) fills them for the steps that follow.

So for these sequences "active positions" means the positions in the forward
(whose residual stream is carried through every layer); the positions
*recomputed* at a layer are the non-verified ones plus `keep`. The plain
forward path never sees this module: the runner passes a `FeatureReuse` only
when a sequence of the step uses feature pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unmask.engine.attention import PackedBatch, PagedAttention
from unmask.engine.kv_pool import KVPool
from unmask.engine.models.transformer import AttentionBackend, Block, Rotary


SIMILARITY_GRID = 1000  # V-verify ranks cosine similarities rounded to 1 / SIMILARITY_GRID


@dataclass
class FeatureUse:
    """A sequence that keeps per-layer features in the pool's feature pages this step."""

    verify: torch.Tensor  # positions (a subset of the step's positions) whose recompute V-verify decides per layer
    keep: int  # how many of `verify` each layer recomputes (the least similar V); <= len(verify)

    def recomputed(self, num_positions: int) -> int:
        """Positions each layer recomputes, of the `num_positions` in the forward."""
        return num_positions - self.verify.numel() + self.keep


@dataclass
class FeaturePlan:
    """Row indices of one packed step (on the model's device), fixed for all layers."""

    verify_rows: torch.Tensor  # rows under V-verify, grouped by sequence
    verify_segment: torch.Tensor  # index of each verify row's sequence among the verifying ones
    pick: torch.Tensor  # where, in the segment-then-similarity order, the kept rows sit
    fixed_rows: torch.Tensor  # rows recomputed at every layer
    cu_recomputed: torch.Tensor  # int32 [S + 1] query offsets of the recomputed rows


def plan_rows(positions: list[torch.Tensor], uses: list[FeatureUse | None], device: torch.device) -> FeaturePlan:
    """Split each sequence's rows of a packed step into always-recomputed and verified ones."""
    verify, segment, pick, fixed, counts = [], [], [], [], []
    offset, verified_so_far = 0, 0
    for pos, use in zip(positions, uses):
        rows = torch.arange(offset, offset + pos.numel())
        offset += pos.numel()
        if use is None or use.verify.numel() == 0:
            fixed.append(rows)
            counts.append(rows.numel())
            continue
        is_verified = torch.isin(pos, use.verify)
        verify.append(rows[is_verified])
        segment.append(torch.full((verify[-1].numel(),), len(verify) - 1))
        pick.append(verified_so_far + torch.arange(use.keep))
        verified_so_far += verify[-1].numel()
        fixed.append(rows[~is_verified])
        counts.append(use.recomputed(pos.numel()))
    return FeaturePlan(
        verify_rows=_cat(verify, device),
        verify_segment=_cat(segment, device),
        pick=_cat(pick, device),
        fixed_rows=_cat(fixed, device),
        cu_recomputed=torch.tensor([0] + counts).cumsum(0).to(device=device, dtype=torch.int32),
    )


def _cat(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)).to(device)


class FeatureReuse:
    """The block's `SublayerReuse`: each layer recomputes the rows V-verify picks; the rest reuse the feature pages."""

    def __init__(self, pool: KVPool, batch: PackedBatch, plan: FeaturePlan, head_dim: int):
        assert pool.attn_out is not None and pool.mlp_out is not None, "the pool has no feature pages"
        self.pool, self.batch, self.plan, self.head_dim = pool, batch, plan, head_dim
        self._rows = plan.fixed_rows  # this layer's recomputed rows (its attention picks them, its MLP reuses them)

    def attention(
        self, block: Block, h: torch.Tensor, positions: torch.Tensor, rotary: Rotary, attention: AttentionBackend, layer: int
    ) -> torch.Tensor:
        assert self.pool.attn_out is not None
        self._rows = rows = self._recomputed_rows(block, h, layer)
        out = self._cached(self.pool.attn_out[layer], h)
        out[rows] = block.attn(h[rows], positions[rows], rotary, self._attention_for(rows), layer)
        self._store(self.pool.attn_out[layer], rows, out)
        return out

    def mlp(self, block: Block, h: torch.Tensor, layer: int) -> torch.Tensor:
        assert self.pool.mlp_out is not None
        out = self._cached(self.pool.mlp_out[layer], h)
        out[self._rows] = block.mlp(h[self._rows])
        self._store(self.pool.mlp_out[layer], self._rows, out)
        return out

    def _store(self, features: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Write the recomputed rows' outputs to their slots of the feature pages.

        Rows of sequences without feature use are written too: harmless (their own
        slots, never read) and cheaper than filtering them out.
        """
        features.view(-1, out.shape[-1])[self.batch.slot_mapping[rows]] = out[rows].to(features.dtype)

    def _recomputed_rows(self, block: Block, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Sorted rows this layer recomputes: the fixed ones and, per sequence, the least similar V."""
        p = self.plan
        if p.verify_rows.numel() == 0:
            return p.fixed_rows
        fresh = block.attn.v_proj(h[p.verify_rows])
        cache = self.pool.v[layer].view(-1, fresh.shape[-1])
        slots = self.batch.slot_mapping[p.verify_rows]
        similarity = F.cosine_similarity(fresh.float(), cache[slots].float(), dim=-1)
        cache[slots] = fresh.to(cache.dtype)
        # Rank on a 1e-3 grid, ties to the leftmost positions (stable sorts): a token's
        # last-bit noise, which differs with the rest of the batch, must not change the
        # choice, and similarities closer than that say nothing anyway.
        by_similarity = torch.argsort(torch.round(similarity * SIMILARITY_GRID), stable=True)
        order = by_similarity[torch.argsort(p.verify_segment[by_similarity], stable=True)]
        return torch.sort(torch.cat([p.fixed_rows, p.verify_rows[order[p.pick]]])).values

    def _cached(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A [T, hidden] buffer holding the cached outputs of the verified rows (the rest is overwritten)."""
        out = torch.empty_like(x)
        rows = self.plan.verify_rows
        out[rows] = features.view(-1, x.shape[-1])[self.batch.slot_mapping[rows]].to(x.dtype)
        return out

    def _attention_for(self, rows: torch.Tensor) -> PagedAttention:
        """The paged attention backend restricted to the recomputed rows as queries."""
        b = self.batch
        sub = PackedBatch(
            input_ids=b.input_ids[rows],
            positions=b.positions[rows],
            slot_mapping=b.slot_mapping[rows],
            cu_seqlens_q=self.plan.cu_recomputed,
            seq_lens=b.seq_lens,
            page_table=b.page_table,
        )
        return PagedAttention(self.pool, sub, self.head_dim)

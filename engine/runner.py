"""The model runner: packs a step's active positions, runs the model, returns the logits asked for.

The scheduler decides *who* runs; the runner decides *how*. It receives, per
sequence, the positions to recompute and the positions whose outputs are
needed for logits, and never looks at policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.attention import PackedBatch, PagedAttention
from engine.cuda_graphs import CudaGraphRunner
from engine.feature_cache import FeatureReuseHook, FeatureUse, plan_rows
from engine.kv_pool import KVPool
from engine.models.loader import LoadedModel
from engine.sequence import Sequence


@dataclass
class SequenceWork:
    """What one sequence needs from a step."""

    seq: Sequence
    positions: torch.Tensor  # sorted absolute positions to recompute (CPU, int64)
    logit_positions: torch.Tensor  # positions whose output rows feed the logits; a subset of `positions`
    key_length: int | None = None  # keys attended are positions [0, key_length); None: the whole sequence
    features: FeatureUse | None = None  # per-layer feature reuse (dLLM-Cache); None: recompute all `positions`

    @property
    def recomputed(self) -> int:
        """Positions each layer recomputes."""
        n = self.positions.numel()
        return n if self.features is None else self.features.recomputed(n)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, pool: KVPool, graphs: CudaGraphRunner | None = None):
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.pool = pool
        self.graphs = graphs  # captured steps on CUDA; None runs eagerly
        # Fault injection for the reliability tests (tests/test_reliability.py), never set
        # otherwise: called with a step's work before the forward pass; whatever it raises
        # is what a failing forward raises, so the engine's per-request isolation is tested for real.
        self.fault_hook: Callable[[list[SequenceWork]], None] | None = None

    def pack(self, work: list[SequenceWork]) -> tuple[PackedBatch, torch.Tensor]:
        """Build the packed batch and the flat row index of every requested logit."""
        counts = [w.positions.numel() for w in work]
        offsets = torch.tensor([0] + counts).cumsum(0)
        max_pages = max(len(w.seq.pages) for w in work)
        page_table = torch.zeros(len(work), max_pages, dtype=torch.int32)
        slots, ids, rows = [], [], []
        for i, w in enumerate(work):
            pages = torch.tensor(w.seq.pages, dtype=torch.long)
            page_table[i, : pages.numel()] = pages.to(torch.int32)
            slots.append(self.pool.slots(pages, w.positions))
            ids.append(w.seq.tokens[w.positions])
            rows.append(offsets[i] + torch.searchsorted(w.positions, w.logit_positions))
        batch = PackedBatch(
            input_ids=torch.cat(ids),
            positions=torch.cat([w.positions for w in work]),
            slot_mapping=torch.cat(slots),
            cu_seqlens_q=offsets.to(torch.int32),
            seq_lens=torch.tensor([w.key_length or w.seq.length for w in work], dtype=torch.int32),
            page_table=page_table,
        )
        moved = PackedBatch(**{k: v.to(self.device, non_blocking=True) for k, v in vars(batch).items()})
        return moved, torch.cat(rows).to(self.device)

    @torch.inference_mode()
    def run(self, work: list[SequenceWork]) -> torch.Tensor:
        """Logits [sum of len(logit_positions), V] (fp32, on the model's device), sequences in order."""
        if self.fault_hook is not None:
            self.fault_hook(work)
        batch, rows = self.pack(work)
        attention = PagedAttention(self.pool, batch, self.config.head_dim)
        hook = None
        if any(w.features is not None for w in work):
            plan = plan_rows([w.positions for w in work], [w.features for w in work], self.device)
            hook = FeatureReuseHook(self.pool, batch, plan, self.config.head_dim)
        if hook is None and self.graphs is not None and self.graphs.supports(len(batch.input_ids), len(batch.seq_lens)):
            hidden = self.graphs.run(batch)
        else:
            hidden = self.model(batch.input_ids, batch.positions, attention, hook)
        return self.model.compute_logits(hidden[rows])

"""The model runner on one device (`runner_interface.Runner`): packs a step's plan, runs the model, proposes.

The scheduler decides *who* runs; the runner decides *how*. It receives, per
sequence, the positions to recompute and the positions whose outputs are
needed for logits, and never looks at policies.
"""

from __future__ import annotations

import logging

import torch

from unmask.engine.attention import PackedBatch, PagedAttention
from unmask.engine.cuda_graphs import CudaGraphRunner
from unmask.engine.feature_cache import FeatureReuse, plan_rows
from unmask.engine.kv_pool import KVPool
from unmask.engine.models.loader import LoadedModel
from unmask.engine.models.transformer import SublayerReuse
from unmask.engine.runner_interface import FaultHook, Proposals
from unmask.engine.sampling import RowGroup, propose_batch
from unmask.engine.transfer import to_device
from unmask.engine.work import SequenceWork

log = logging.getLogger(__name__)


def limit_host_threads(device: torch.device) -> None:
    """With the model on a GPU, run the host's tensor ops on one thread.

    The host side of a step is bookkeeping on tensors of a few hundred elements;
    some ops (e.g. `repeat_interleave`) still fan out to every OpenMP thread, and
    with two engine processes on one host (one per GPU, tensor-parallel ranks)
    the threads contend: a profile of a batch-64 step beside another engine
    showed 11 ms per `repeat_interleave` call. On the CPU the model needs them.
    """
    if device.type == "cuda" and torch.get_num_threads() > 1:
        log.info("model on %s: torch host ops limited to one thread (was %d)", device, torch.get_num_threads())
        torch.set_num_threads(1)


class ModelRunner:
    def __init__(self, loaded: LoadedModel, pool: KVPool, graphs: CudaGraphRunner | None = None):
        limit_host_threads(loaded.device)
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.pool = pool
        self.graphs = graphs  # captured steps on CUDA; None runs eagerly
        self.fault_hook: FaultHook | None = None  # see `Runner.fault_hook`

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def has_features(self) -> bool:
        return self.pool.has_features

    def pack(self, work: list[SequenceWork]) -> tuple[PackedBatch, torch.Tensor]:
        """Build the packed batch and the flat row index of every requested logit (on the model's device)."""
        batch, rows = self.pack_host(work)
        return batch_to(batch, self.device), to_device(rows, self.device)

    def pack_host(self, work: list[SequenceWork]) -> tuple[PackedBatch, torch.Tensor]:
        """`pack` on the CPU (what a tensor-parallel engine sends to its workers).

        Whole-batch tensor ops rather than a few per sequence: at batch 64 the
        host's per-sequence bookkeeping is what the GPU waits for.
        """
        counts = torch.tensor([w.positions.numel() for w in work])
        max_pages = max(len(w.seq.pages) for w in work)
        page_table = torch.tensor([w.seq.pages + [0] * (max_pages - len(w.seq.pages)) for w in work], dtype=torch.int32)
        positions = torch.cat([w.positions for w in work])
        owner = _owners(counts)  # the sequence of each packed token
        batch = PackedBatch(
            input_ids=torch.cat([w.seq.tokens[w.positions] for w in work]),
            positions=positions,
            slot_mapping=self.pool.slots_in_table(page_table, owner, positions),
            cu_seqlens_q=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32),
            seq_lens=torch.tensor([w.key_length or w.seq.length for w in work], dtype=torch.int32),
            page_table=page_table,
        )
        return batch, _logit_rows(work, owner, positions)

    @torch.inference_mode()
    def run(self, work: list[SequenceWork]) -> torch.Tensor:
        """Logits [sum of len(logit_positions), V] (in the model's dtype, on its device), sequences in order."""
        if self.fault_hook is not None:
            self.fault_hook(work)
        batch, rows = self.pack(work)
        reuse = None
        if any(w.features is not None for w in work):
            plan = plan_rows([w.positions for w in work], [w.features for w in work], self.device)
            reuse = FeatureReuse(self.pool, batch, plan, self.config.head_dim)
        return self.forward(batch, rows, reuse)

    def forward(self, batch: PackedBatch, rows: torch.Tensor, reuse: SublayerReuse | None = None) -> torch.Tensor:
        """The logits of the given rows of a packed batch (device tensors)."""
        attention = PagedAttention(self.pool, batch, self.config.head_dim, self.config.attention_block_size)
        if reuse is None and self.graphs is not None and self.graphs.supports(len(batch.input_ids), len(batch.seq_lens)):
            hidden = self.graphs.run(batch)
        else:
            hidden = self.model(batch.input_ids, batch.positions, attention, reuse)
        return self.model.compute_logits(hidden[rows])

    def propose(self, work: list[SequenceWork], groups: list[RowGroup]) -> Proposals:
        """Run the step and propose a token and a confidence per logit row (CPU tensors, rows in order)."""
        return propose_batch(self.run(work), groups, self.config.mask_token_id)


def _owners(counts: torch.Tensor) -> torch.Tensor:
    """Index of the sequence each of a packed list's items belongs to, given the items per sequence."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def _logit_rows(work: list[SequenceWork], owner: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The packed row of every requested logit position, sequences in order.

    Keyed by (sequence, position), the packed tokens are sorted (each
    sequence's positions ascend), so one search finds every row.
    """
    span = max(w.seq.length for w in work) + 1
    logit_owner = _owners(torch.tensor([w.logit_positions.numel() for w in work]))
    wanted = logit_owner * span + torch.cat([w.logit_positions for w in work])
    return torch.searchsorted(owner * span + positions, wanted)


def batch_to(batch: PackedBatch, device: torch.device) -> PackedBatch:
    return PackedBatch(**{k: to_device(v, device) for k, v in vars(batch).items()})

"""CUDA graphs for denoising steps: the model body captured per (tokens, sequences) bucket.

At small batch a step is bound by launch overhead, not the GPU: 32 layers of
a dozen kernels each, plus Python. A captured graph replays all of them with
one launch. Shapes must be static, so a step's packed batch is padded up to a
bucket: padded tokens write no K/V (slot -1, skipped by `write_kv`) and
belong to one extra dummy sequence whose single key they attend to; further
dummy sequences have no queries. Their outputs are discarded. The LM head
and the confidence kernel stay outside the graph: they run on the few rows
that need logits.

The kernels read every index from device tensors (no host copies), which is
what makes them capturable; the static buffers are refilled before each replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from unmask.engine.attention import PackedBatch, PagedAttention
from unmask.engine.kv_pool import KVPool
from unmask.engine.models.transformer import DiffusionTransformer

if TYPE_CHECKING:
    from unmask.engine.config import EngineConfig

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class _CapturedStep:
    graph: torch.cuda.CUDAGraph
    batch: PackedBatch  # the static input buffers
    hidden: torch.Tensor  # the static output [tokens, hidden]


class CudaGraphRunner:
    """Runs the model body through captured graphs when the step fits a bucket."""

    def __init__(self, model: DiffusionTransformer, pool: KVPool, max_tokens: int, max_seqs: int, max_pages: int):
        self.model, self.pool = model, pool
        self.token_buckets = tuple(b for b in TOKEN_BUCKETS if b <= max_tokens)
        self.max_seqs = _pow2_at_least(max_seqs + 1)  # + the dummy sequence of the padding
        self.max_pages = max_pages
        self.device = pool.k.device
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}
        self._mempool = torch.cuda.graph_pool_handle()

    def supports(self, num_tokens: int, num_seqs: int) -> bool:
        return _bucket(num_tokens, self.token_buckets) is not None and num_seqs + 1 <= self.max_seqs

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def release(self) -> None:
        """Free every captured graph (the next step captures again).

        A tensor-parallel rank calls it before leaving its NCCL group: tearing
        down a communicator hangs while graphs holding its collectives are
        alive (pytorch/pytorch#115388).
        """
        torch.cuda.synchronize(self.device)
        for step in self._graphs.values():
            step.graph.reset()
        self._graphs.clear()

    def run(self, batch: PackedBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of a packed batch (host or device tensors); valid until the next run."""
        tokens, seqs = batch.input_ids.numel(), batch.seq_lens.numel()
        key = (_bucket(tokens, self.token_buckets), _pow2_at_least(seqs + 1))
        step = self._graphs.get(key) or self._capture(*key)
        self._fill(step.batch, batch)
        step.graph.replay()
        return step.hidden[:tokens]

    def _fill(self, static: PackedBatch, batch: PackedBatch) -> None:
        tokens, seqs = batch.input_ids.numel(), batch.seq_lens.numel()
        padded = static.input_ids.numel()
        static.input_ids[:tokens].copy_(batch.input_ids, non_blocking=True)
        static.positions[:tokens].copy_(batch.positions, non_blocking=True)
        static.slot_mapping[:tokens].copy_(batch.slot_mapping, non_blocking=True)
        static.slot_mapping[tokens:].fill_(-1)
        static.cu_seqlens_q[: seqs + 1].copy_(batch.cu_seqlens_q, non_blocking=True)
        static.cu_seqlens_q[seqs + 1 :].fill_(padded)  # the padding belongs to dummy sequence `seqs`
        static.seq_lens[:seqs].copy_(batch.seq_lens, non_blocking=True)
        static.seq_lens[seqs:].fill_(1)
        width = batch.page_table.shape[1]
        static.page_table[:seqs, :width].copy_(batch.page_table, non_blocking=True)
        static.page_table[seqs:, 0].fill_(0)

    def _static_batch(self, tokens: int, seqs: int) -> PackedBatch:
        """Buffers holding only padding: one dummy sequence owns every token and writes nothing."""
        dev = self.device
        cu = torch.full((seqs + 1,), tokens, dtype=torch.int32, device=dev)
        cu[0] = 0
        return PackedBatch(
            input_ids=torch.zeros(tokens, dtype=torch.long, device=dev),
            positions=torch.zeros(tokens, dtype=torch.long, device=dev),
            slot_mapping=torch.full((tokens,), -1, dtype=torch.long, device=dev),
            cu_seqlens_q=cu,
            seq_lens=torch.ones(seqs, dtype=torch.int32, device=dev),
            page_table=torch.zeros(seqs, self.max_pages, dtype=torch.int32, device=dev),
        )

    def _capture(self, tokens: int, seqs: int) -> _CapturedStep:
        static = self._static_batch(tokens, seqs)
        attention = PagedAttention(self.pool, static, self.model.cfg.head_dim, self.model.cfg.attention_block_size)
        # Warm up on a side stream first: Triton compiles and the allocator settles outside the capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(static.input_ids, static.positions, attention)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            hidden = self.model(static.input_ids, static.positions, attention)
        step = _CapturedStep(graph, static, hidden)
        self._graphs[(tokens, seqs)] = step
        return step


def build_graph_runner(model: DiffusionTransformer, pool: KVPool, config: EngineConfig) -> CudaGraphRunner | None:
    """The engine's graph runner on CUDA (None on the CPU or with `cuda_graph_max_tokens` 0: every step runs eagerly)."""
    if pool.k.device.type != "cuda" or config.cuda_graph_max_tokens <= 0:
        return None
    max_pages = min(pool.num_pages, -(-model.cfg.max_position // pool.page_size))  # of the longest sequence
    return CudaGraphRunner(model, pool, config.cuda_graph_max_tokens, config.max_num_seqs, max_pages)

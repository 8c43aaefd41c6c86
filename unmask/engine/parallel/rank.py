"""One rank's share of a tensor-parallel engine, and the step that every rank runs in lockstep.

Every rank holds the KV of its own heads for the *same* pages (one page table,
kept by rank 0's scheduler), so the ranks agree on the number of pages: the
fewest that fit on any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.engine.config import EngineConfig
from unmask.engine.cuda_graphs import build_graph_runner
from unmask.engine.kv_pool import KVPool
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.loader import LoadedModel
from unmask.engine.parallel.layers import VocabShard
from unmask.engine.parallel.plan import StepPlan
from unmask.engine.parallel.state import ParallelState
from unmask.engine.parallel.vocab import blank_columns, combine_stats, shard_stats
from unmask.engine.runner import ModelRunner, batch_to
from unmask.engine.transfer import to_device


@dataclass
class RankModel:
    """A rank's shard of the model behind a runner over its shard of the KV pool."""

    state: ParallelState
    runner: ModelRunner
    vocab: VocabShard

    @property
    def pool(self) -> KVPool:
        return self.runner.pool

    def release_graphs(self) -> None:
        """Before leaving the group: NCCL's teardown hangs while captured collectives live."""
        if self.runner.graphs is not None:
            self.runner.graphs.release()


@dataclass
class StepResult:
    """The step's proposals, identical on every rank (rank 0 uses them; workers drop them)."""

    tokens: torch.Tensor  # int64 [N]
    confidence: torch.Tensor  # float32 [N]
    gathered: torch.Tensor | None  # [M, V] the full logits of the plan's `gather_rows`


def pool_config(cfg: ModelConfig, world_size: int) -> ModelConfig:
    """The model's shape as one rank's KV pool sees it: its share of the KV heads."""
    return replace(cfg, num_kv_heads=cfg.num_kv_heads // world_size)


def kv_pages(loaded: LoadedModel, config: EngineConfig) -> int:
    """How many pages of this rank's KV heads fit in its KV budget (taken from the memory free now)."""
    cfg = pool_config(loaded.config, config.tensor_parallel_size)
    return config.kv_cache_bytes(loaded.device) // KVPool.bytes_per_page(cfg, config.page_size, loaded.dtype)


def join(state: ParallelState, loaded: LoadedModel, config: EngineConfig, init_file: str, pages: int) -> RankModel:
    """Join the group, agree on the pool size and build this rank's pool and runner (every rank calls it)."""
    state.join(init_file)
    cfg = pool_config(loaded.config, state.world_size)
    pool = KVPool(cfg, state.min(pages), config.page_size, loaded.dtype, loaded.device)
    runner = ModelRunner(loaded, pool, build_graph_runner(loaded.model, pool, config))
    return RankModel(state, runner, VocabShard.of(loaded.config.vocab_size, state.rank, state.world_size))


@torch.inference_mode()
def run_step(rank: RankModel, plan: StepPlan) -> StepResult:
    """Forward this rank's shard over the plan's batch and reduce the split logits with the other ranks."""
    runner, device = rank.runner, rank.runner.device
    logits = runner.forward(batch_to(plan.batch, device), to_device(plan.logit_rows, device))
    blank_columns(logits, rank.vocab, runner.config.mask_token_id)
    sampling = plan.sampling
    stats = shard_stats(logits, rank.vocab, to_device(sampling.temperature, device), to_device(sampling.seeds, device))
    tokens, confidence = combine_stats(rank.state.all_gather(stats.pack()))
    gathered = None
    if sampling.gather_rows.numel():
        # Top-p, margin and entropy need the whole distribution of their rows: those rows are gathered.
        parts = rank.state.all_gather(logits[to_device(sampling.gather_rows, device)])  # [tp, M, shard size]
        rows = parts.shape[1]
        gathered = parts.permute(1, 0, 2).reshape(rows, -1)[:, : rank.vocab.vocab_size]
    return StepResult(tokens, confidence, gathered)

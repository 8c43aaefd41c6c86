"""Rank 0 of a tensor-parallel engine: it lives in the engine process, beside the scheduler.

`TensorParallelGroup` starts the workers and loads rank 0's shard; once the
engine has loaded what else it needs (the guide), `start()` joins the group
and returns the `TensorParallelRunner`, which stands in for the
`ModelRunner`: per step it packs the batch, sends the plan to the workers and
runs its own share of the same step. If that fails midway the other ranks are
stuck in collectives that cannot complete, so the group is torn down and the
engine is dead (`EngineDeadError`), never hung.
"""

from __future__ import annotations

import torch

from unmask.engine.config import EngineConfig
from unmask.engine.cuda_graphs import CudaGraphRunner
from unmask.engine.kv_pool import KVPool
from unmask.engine.models.loader import LoadedModel
from unmask.engine.parallel.loading import ShardLoader, shard_loader
from unmask.engine.parallel.plan import Join, SamplingPlan, StepPlan
from unmask.engine.parallel.processes import WorkerGroup
from unmask.engine.parallel.rank import RankModel, join, kv_pages, run_step
from unmask.engine.parallel.state import ParallelState, rank_device
from unmask.engine.runner_interface import FaultHook, Proposals
from unmask.engine.sampling import RowGroup, complete_proposals, row_inputs
from unmask.engine.work import SequenceWork


class TensorParallelRunner:
    """The `Runner` of a tensor-parallel group, called on rank 0."""

    def __init__(self, rank: RankModel, workers: WorkerGroup):
        self.rank, self.workers = rank, workers
        self.fault_hook: FaultHook | None = None  # see `Runner.fault_hook`

    @property
    def pool(self) -> KVPool:
        """Rank 0's share of the KV tensors."""
        return self.rank.pool

    @property
    def num_pages(self) -> int:
        return self.rank.pool.num_pages  # agreed by the group: the fewest any rank holds

    @property
    def has_features(self) -> bool:
        return self.rank.pool.has_features

    @property
    def graphs(self) -> CudaGraphRunner | None:
        return self.rank.runner.graphs

    def propose(self, work: list[SequenceWork], groups: list[RowGroup]) -> Proposals:
        """Send the step to the workers, run rank 0's share, and complete the proposals."""
        if self.fault_hook is not None:
            self.fault_hook(work)
        batch, rows = self.rank.runner.pack_host(work)
        inputs = row_inputs(groups)
        sampled = inputs.temperature * inputs.fused  # the other rows are sampled from their gathered logits
        plan = StepPlan(batch, rows, SamplingPlan(sampled, inputs.row_seeds, inputs.general_rows))
        self.workers.send(plan)
        try:
            result = run_step(self.rank, plan)
        except Exception as exc:
            raise self.workers.fail(f"rank 0: {type(exc).__name__}: {exc}") from exc
        return complete_proposals(result.tokens, result.confidence, result.gathered, inputs, groups)


class TensorParallelGroup:
    """Rank 0's side of the group: the worker processes and rank 0's shard."""

    def __init__(self, config: EngineConfig, shards: ShardLoader | None = None):
        tp = config.tensor_parallel_size
        self.config = config
        self.state = ParallelState(0, tp, rank_device(config.device, 0))
        if self.state.device.type == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs; {torch.cuda.device_count()} are visible")
        self.state.select_device()
        shards = shards or shard_loader(config)
        self.rank: RankModel | None = None  # rank 0's shard, once `start` has joined the group
        self.workers = WorkerGroup(config, shards)
        try:
            self.loaded: LoadedModel = shards.load(self.state)  # while the workers load theirs
        except BaseException:
            self.workers.close()
            raise

    def start(self) -> TensorParallelRunner:
        """Wait for the workers, join the group and build rank 0's pool and runner."""
        pages = kv_pages(self.loaded, self.config)  # measured now: after whatever rank 0 loaded besides
        self.workers.wait_ready()
        self.workers.send(Join())
        self.rank = join(self.state, self.loaded, self.config, self.workers.init_file, pages)
        # A worker that dies mid-step would leave rank 0 waiting in a collective: abort it instead.
        self.workers.watch(self.state.abort)
        return TensorParallelRunner(self.rank, self.workers)

    def close(self) -> None:
        """Stop the workers and leave the group."""
        if self.workers.failure is None:
            self.workers.request_stop()
            if self.rank is not None:
                self.rank.release_graphs()
            self.state.leave()  # while the workers leave: NCCL's teardown waits for every rank
        elif self.state.backend == "gloo":
            self.state.leave()  # NCCL's would wait for the dead ranks: a failed NCCL group is left as it is
        self.workers.close()

"""Tensor parallelism across the GPUs of one host.

One process per rank: rank 0 is the engine process (scheduler, policies,
sampling decisions); ranks 1..N-1 are workers that run the same forward on
their shards. Per step rank 0 sends the packed batch to the workers
(`plan`), every rank runs its shard (`rank`), the split logits are reduced
without gathering them (`vocab`). The model split is in `layers`, the
sharded loading in `loading`, the group and its collectives in `state`, the
worker processes in `worker` (their side) and `processes` (rank 0's side),
and rank 0's runner in `driver`.
"""

from unmask.engine.parallel.driver import TensorParallelGroup, TensorParallelRunner
from unmask.engine.parallel.loading import CheckpointShards, RandomShards, ShardLoader

__all__ = ["CheckpointShards", "RandomShards", "ShardLoader", "TensorParallelGroup", "TensorParallelRunner"]

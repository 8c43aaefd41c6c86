"""The runner interface: what the engine needs from whatever executes a step's plan.

`ModelRunner` (one device) and `parallel.TensorParallelRunner` (rank 0 of a
tensor-parallel group) implement it. The runner owns the tensors that hold the
KV pages (and feature pages); the engine's page allocator hands out their ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from unmask.engine.cuda_graphs import CudaGraphRunner
    from unmask.engine.sampling import RowGroup
    from unmask.engine.work import SequenceWork

Proposals = tuple[torch.Tensor, torch.Tensor]  # (token ids [N], confidence [N]) of a step's logit rows, on the CPU
FaultHook = Callable[[list["SequenceWork"]], None]


@runtime_checkable
class Runner(Protocol):
    # Fault injection for the reliability tests (tests/test_reliability.py), never set otherwise:
    # called with a step's work before the forward pass; what it raises is what a failing forward raises.
    fault_hook: FaultHook | None

    @property
    def num_pages(self) -> int:
        """Pages the KV tensors hold (on every rank alike)."""
        ...

    @property
    def has_features(self) -> bool:
        """Whether the pages also hold per-layer features (`cache=dllm-cache`)."""
        ...

    @property
    def graphs(self) -> CudaGraphRunner | None:
        """The captured CUDA graphs (None: every step runs eagerly)."""
        ...

    def propose(self, work: list[SequenceWork], groups: list[RowGroup]) -> Proposals:
        """Run the step and propose a token and a confidence per logit row (rows in work order)."""
        ...

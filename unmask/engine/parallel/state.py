"""Who this process is in a tensor-parallel group, and the collectives the sharded model uses.

Every rank is one process with one device: rank r runs on `cuda:r` (NCCL) or on
the CPU (gloo). The group is torch.distributed's default process group, so one
process belongs to at most one tensor-parallel engine at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# NVLink SHARP (NVLS) buffers cost GPU memory per communicator and gain nothing for the
# small all-reduces of one host's tensor parallelism; some drivers fail to set them up.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}
# A collective that waits longer than this means a rank is gone (its peers then fail instead of hanging).
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class ParallelState:
    """One rank of a tensor-parallel group: its index, the group's size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def select_device(self) -> None:
        """Make the rank's GPU the current one (Triton launches its kernels on the current device)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def join(self, init_file: str) -> None:
        """Join the group that every rank joins through the same rendezvous file."""
        os.environ.update(NCCL_ENV)
        dist.init_process_group(
            self.backend,
            init_method=f"file://{init_file}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )

    def leave(self) -> None:
        """Tear the group down; with NCCL every rank must do it (it waits for them)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def abort(self) -> None:
        """Make collectives in flight fail now, when a rank is known to be dead.

        gloo notices a closed peer by itself; NCCL would wait for it until `COLLECTIVE_TIMEOUT`.
        """
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if self.backend == "nccl" and dist.is_initialized() and abort is not None:
            abort()

    # --- collectives (no-ops for a single rank, so a shard can run alone in tests) ---
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world_size, *x.shape]: every rank's `x`, by rank."""
        if self.world_size == 1:
            return x[None]
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    def min(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: `cuda:r` for "cuda" (or "auto" with CUDA), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(
            f"with tensor parallelism the device is auto, cuda or cpu (rank r uses cuda:r), got {device!r}; "
            "choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", rank)

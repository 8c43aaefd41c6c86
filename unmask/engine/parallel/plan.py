"""What rank 0 tells its workers, and what they tell it, through one pipe per worker.

A step travels as one `StepPlan`: the packed batch (token ids, positions, KV
slots, page tables), the rows that need logits and the sampling inputs. With
them every worker runs exactly the forward and the reduction rank 0 runs.
Messages are pickled once and the same bytes go to every worker, tensors as
numpy arrays: by value (multiprocessing's pickler would make each one a
shared-memory segment) and ten times faster to pickle than torch's own way.

The plans go through pipes rather than a collective so that a worker waits
for work without holding a collective open: it notices at once when the
engine closes its end, and the engine never blocks on a worker between steps.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from unmask.engine.attention import PackedBatch


@dataclass
class SamplingPlan:
    temperature: torch.Tensor  # float32 [N]; 0 for greedy rows and for the rows in `gather_rows`
    seeds: torch.Tensor  # int64 [N] each row's noise seed
    gather_rows: torch.Tensor  # int64 [M] rows whose full logits rank 0 needs (top-p, margin, entropy)


@dataclass
class StepPlan:
    """One step for every rank: inputs on the CPU, ranks move them to their device."""

    batch: PackedBatch
    logit_rows: torch.Tensor  # int64 [N] rows of the packed batch whose logits are needed
    sampling: SamplingPlan


@dataclass
class Join:
    """Every rank has loaded its shard: join the group (so no rank waits on a slow load in a rendezvous)."""


@dataclass
class Shutdown:
    """The engine is closing: leave the group and exit."""


@dataclass
class Ready:
    """A worker loaded its shard and is about to join the group."""

    rank: int


@dataclass
class Failed:
    """A worker could not go on; `error` is its traceback."""

    rank: int
    error: str


Message = StepPlan | Join | Shutdown | Ready | Failed


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def encode(message: Message) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


def receive(conn: Connection) -> Message:
    """The next message (raises EOFError when the other end is closed)."""
    return pickle.loads(conn.recv_bytes())

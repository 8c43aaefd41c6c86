"""Each rank loads only its shard: from a checkpoint (slicing tensors on read) or as random weights.

Slicing on read is what lets a model larger than one GPU load: no rank ever
holds a whole tensor of the sharded kinds. Which dimension a rank cuts, and
where, follows from its shard's shapes (`engine.parallel.layers`): the one
dimension in which the shard is smaller than the checkpoint tensor is split
evenly, rank r taking the r-th piece (zero-padded past the end, for a
vocabulary that does not divide evenly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from unmask.engine.config import EngineConfig
from unmask.engine.models.arch import CheckpointError
from unmask.engine.models.checkpoint import load_weights, random_weights, read_config
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.loader import (
    LoadedModel,
    check_quantization,
    load_tokenizer,
    quantize,
    read_dummy_config,
    resolve_dtype,
)
from unmask.engine.models.transformer import DiffusionTransformer
from unmask.engine.parallel.layers import shard_model
from unmask.engine.parallel.state import ParallelState


class ShardLoader(Protocol):
    """Gives one rank its shard of the model (picklable: it travels to the worker processes)."""

    def load(self, state: ParallelState) -> LoadedModel:
        """The rank's shard on `state.device`; only rank 0 gets the tokenizer (the others never detokenize)."""
        ...


def read_shard(tensor, shape: torch.Size, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece, of `shape`, of a safetensors slice; reads only that piece from the file."""
    full = tuple(tensor.get_shape())
    split = [d for d, (whole, part) in enumerate(zip(full, shape)) if whole != part]
    if len(full) != len(shape) or len(split) > 1:
        raise CheckpointError(f"a tensor of shape {full} cannot be split into shards of shape {tuple(shape)}")
    if not split:
        return tensor[:]
    dim = split[0]
    start = min(rank * shape[dim], full[dim])
    stop = min(start + shape[dim], full[dim])
    index = [slice(None)] * len(full)
    index[dim] = slice(start, stop)
    piece = tensor[tuple(index)]
    if stop - start == shape[dim]:
        return piece
    padded = torch.zeros(shape, dtype=piece.dtype)
    padded.narrow(dim, 0, stop - start).copy_(piece)
    return padded


@dataclass(frozen=True)
class RankSlicer:
    """`checkpoint.Sharding` for one rank."""

    state: ParallelState

    def split(self, model: DiffusionTransformer) -> None:
        shard_model(model, self.state)

    def read(self, tensor, shape: torch.Size) -> torch.Tensor:
        return read_shard(tensor, shape, self.state.rank)


@dataclass(frozen=True)
class CheckpointShards:
    """Shards of a Hugging Face checkpoint directory (the same layout `load_model` reads)."""

    model_dir: str
    dtype: str = "auto"
    quantization: str = "none"

    def load(self, state: ParallelState) -> LoadedModel:
        cfg = read_config(self.model_dir)
        dtype = resolve_dtype(self.dtype, state.device)
        check_quantization(self.quantization, state.device, dtype)
        model = load_weights(self.model_dir, dtype, state.device, RankSlicer(state))
        quantize(model, self.quantization, state.all_reduce)
        tokenizer = load_tokenizer(self.model_dir) if state.rank == 0 else None
        return LoadedModel(model, cfg, tokenizer, state.device, dtype)


@dataclass(frozen=True)
class RandomShards:
    """Random weights (normal, `std`) of `config`'s shapes, drawn by each rank for its own shard.

    For benchmarks of large shapes and `--load-format dummy`: nothing is written to disk or read back.
    The weights differ from a single-device random model's.
    """

    config: ModelConfig
    tokenizer_dir: str
    dtype: str = "auto"
    std: float = 0.02
    seed: int = 0
    quantization: str = "none"

    def load(self, state: ParallelState) -> LoadedModel:
        dtype = resolve_dtype(self.dtype, state.device)
        check_quantization(self.quantization, state.device, dtype)
        seed = self.seed * 1009 + state.rank
        model = random_weights(self.config, dtype, state.device, RankSlicer(state), self.std, seed)
        quantize(model, self.quantization, state.all_reduce)
        tokenizer = load_tokenizer(self.tokenizer_dir) if state.rank == 0 else None
        return LoadedModel(model, self.config, tokenizer, state.device, dtype)


def shard_loader(config: EngineConfig) -> ShardLoader:
    """How the ranks load `config.model_dir`: slices of its weights, or (`load_format="dummy"`)
    random weights of its `config.json`'s shapes."""
    if config.load_format == "dummy":
        return RandomShards(
            read_dummy_config(config.model_dir), config.model_dir, config.dtype, quantization=config.quantization
        )
    return CheckpointShards(config.model_dir, config.dtype, config.quantization)

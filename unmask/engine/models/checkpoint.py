"""Reading and writing checkpoints in the Hugging Face directory layout.

A directory holds `config.json` and either `model.safetensors` or shards named
by `model.safetensors.index.json` — exactly the layout of the public LLaDA-8B,
Dream-7B, SDAR, Fast-dLLM v2, LLaDA-MoE, LLaDA2.x and SDAR-MoE checkpoints, so
they load unchanged. Where a checkpoint stores several of our parameters in one
tensor (LLaDA2's `query_key_value`), each is read as `Rows` of it (`RowsOf`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unmask.engine.models.arch import Architecture, CheckpointError, Rows
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.dream import DREAM
from unmask.engine.models.fastdllm_v2 import FASTDLLM_V2
from unmask.engine.models.llada import LLADA
from unmask.engine.models.llada2 import LLADA2
from unmask.engine.models.llada_moe import LLADA_MOE
from unmask.engine.models.sdar import SDAR
from unmask.engine.models.sdar_moe import SDAR_MOE
from unmask.engine.models.transformer import DiffusionTransformer, Rotary

ARCHITECTURES: tuple[Architecture, ...] = (LLADA, DREAM, SDAR, FASTDLLM_V2, LLADA_MOE, LLADA2, SDAR_MOE)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def architecture_for(model_type: str, hf: dict | None = None) -> Architecture:
    """The family of a `model_type` (or a `ModelConfig.arch`); with the config `hf`, the family that claims it."""
    for arch in ARCHITECTURES:
        if model_type.lower() in arch.model_types and (hf is None or arch.claims is None or arch.claims(hf)):
            return arch
    known = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise CheckpointError(f"unknown model_type {model_type!r}; Unmask implements: {known}")


def read_config(model_dir: str | Path) -> ModelConfig:
    """Parse `config.json` of a checkpoint directory into a `ModelConfig`."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist or is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if "model_type" not in hf:
        raise CheckpointError(f"{config_path} lacks 'model_type'")
    return architecture_for(hf["model_type"], hf).parse_config(hf)


def _tensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{str(model_dir)!r} holds no *.safetensors weights")
    return found


class Sharding(Protocol):
    """How one tensor-parallel rank's shard is built and read (see `engine.parallel.loading`)."""

    def split(self, model: DiffusionTransformer) -> None:
        """Shrink the (meta-device) model to this rank's shard, in place."""
        ...

    def read(self, tensor, shape: torch.Size) -> torch.Tensor:
        """This rank's part, of `shape`, of a safetensors slice of the whole tensor."""
        ...


def empty_model(
    cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device, sharding: Sharding | None = None
) -> DiffusionTransformer:
    """The model of `cfg` (with `sharding`, one rank's shard), its weights allocated but not set.

    Built on the meta device and allocated once, on `device` and in `dtype`, so
    no copy of the weights ever exists in float32 or on the CPU.
    """
    with torch.device("meta"):
        model = DiffusionTransformer(cfg)
        if sharding is not None:
            sharding.split(model)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings and model.lm_head.weight.shape == model.embed.weight.shape:
        model.lm_head.weight = model.embed.weight  # `to_empty` gives each module its own copy: tie them again
    model.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.max_position).to(device)  # a computed buffer, not a weight
    model.fuse_projections()
    return model


def random_weights(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device,
    sharding: Sharding | None = None,
    std: float = 0.02,
    seed: int = 0,
) -> DiffusionTransformer:
    """The model of `cfg` with every weight drawn from N(0, `std`), made directly on `device`.

    For load tests and benchmarks of a model's shapes without its checkpoint
    (`--load-format dummy`): what it writes is meaningless text.
    """
    model = empty_model(cfg, dtype, device, sharding)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std, generator=generator)
    return model.eval()


def load_weights(
    model_dir: str | Path, dtype: torch.dtype, device: str | torch.device, sharding: Sharding | None = None
) -> DiffusionTransformer:
    """Build the model described by `config.json` and fill it from the safetensors files.

    With `sharding`, only one tensor-parallel rank's shard is built, and only its
    slice of each tensor is read.
    """
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    names = architecture_for(cfg.arch).tensor_names(cfg)
    model = empty_model(cfg, dtype, device, sharding)
    params = dict(model.named_parameters())
    wanted: dict[str, list[tuple[str, Rows | None]]] = {}
    for ours in params:
        if ours in names:
            theirs = names[ours]
            key, rows = (theirs.key, theirs) if isinstance(theirs, Rows) else (theirs, None)
            wanted.setdefault(key, []).append((ours, rows))
    loaded: set[str] = set()
    for file in _tensor_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                for ours, rows in wanted.get(key, ()):
                    param = params[ours]
                    whole = f.get_slice(key) if rows is None else RowsOf(f.get_slice(key), rows)
                    tensor = whole[:] if sharding is None else sharding.read(whole, param.shape)
                    _copy_into(param, tensor, key)
                    loaded.add(key)
    missing = sorted(set(wanted) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {str(model_dir)!r} is missing tensors: {shown}")
    return model.eval()


@dataclass(frozen=True)
class RowsOf:
    """`rows` of a safetensors slice, read as a slice of its own (shape, indexing), so a rank's shard
    of one fused part (`Sharding.read`) reads only that piece from the file."""

    whole: Any
    rows: Rows

    def get_shape(self) -> list[int]:
        return [self.rows.stop - self.rows.start, *self.whole.get_shape()[1:]]

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        first = range(self.rows.start, self.rows.stop)[index[0]]
        return self.whole[(slice(first.start, first.stop), *index[1:])]


def _copy_into(param: torch.nn.Parameter, tensor: torch.Tensor, key: str) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise CheckpointError(f"tensor {key} has shape {tuple(tensor.shape)}, config implies {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))


def save_checkpoint(
    model: DiffusionTransformer,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 16 * 2**20,
) -> Path:
    """Write `config.json` and safetensors in the family's public layout, sharding past `max_shard_bytes`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    arch = architecture_for(cfg.arch)
    tensors = _checkpoint_tensors(model.state_dict(), arch.tensor_names(cfg), dtype)
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_config(cfg, out, dtype)
    return out


def _checkpoint_tensors(
    state: dict[str, torch.Tensor], names: dict[str, str | Rows], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by their names; parts stored as `Rows` of one tensor are concatenated in row order."""
    tensors: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for ours, theirs in names.items():
        tensor = state[ours].detach().to("cpu", dtype)
        if isinstance(theirs, Rows):
            fused.setdefault(theirs.key, []).append((theirs.start, tensor))
        else:
            tensors[theirs] = tensor.contiguous()
    for key, parts in fused.items():
        tensors[key] = torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])])
    return tensors


def write_config(cfg: ModelConfig, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `config.json` of `cfg` in its family's public layout; returns its path."""
    hf = architecture_for(cfg.arch).to_hf_config(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    path = Path(out_dir) / "config.json"
    path.write_text(json.dumps(hf, indent=2) + "\n")
    return path


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards

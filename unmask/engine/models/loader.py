"""Load a local checkpoint directory: config, weights and tokenizer. Never the network."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from unmask.engine.config import DUMMY_NEEDS, EngineConfig
from unmask.engine.models.arch import CheckpointError
from unmask.engine.models.checkpoint import load_weights, random_weights, read_config
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.fp8 import Reduce, check_fp8_shapes, check_fp8_support, quantize_fp8
from unmask.engine.models.transformer import DiffusionTransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: DiffusionTransformer
    config: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPUs and fp32 on the CPU (bf16 matmuls are slow and coarse there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    # Offline by construction: a local path, no hub lookups, no remote code.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # AutoTokenizer warns that it cannot map our model_type to a transformers class;
    # that is expected (the models are implemented here), so keep it quiet.
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types; the user needs one clear message
        raise CheckpointError(f"cannot load the tokenizer from {str(model_dir)!r}: {exc}") from exc


def read_dummy_config(model_dir: str | Path) -> ModelConfig:
    """`config.json` of a directory served with `load_format="dummy"`; its absence is explained."""
    if not (Path(model_dir) / "config.json").is_file():
        raise CheckpointError(f"{str(model_dir)!r} has no config.json. {DUMMY_NEEDS}")
    return read_config(model_dir)


def read_model_config(model_dir: str | Path, load_format: str) -> ModelConfig:
    """`config.json` of `model_dir`, with the dummy format's explanation when it is missing."""
    return read_dummy_config(model_dir) if load_format == "dummy" else read_config(model_dir)


def check_quantization(quantization: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a quantization the device or dtype cannot run (before any weight is read)."""
    if quantization == "fp8":
        check_fp8_support(device, dtype)


def check_engine_quantization(config: EngineConfig) -> None:
    """A startup check, before anything loads: `check_quantization` for the device and dtype `config` asks
    for, and the model's shapes (one tensor-parallel shard's) against what the quantized products need."""
    if config.quantization == "fp8":
        device = resolve_device(config.device)
        check_fp8_support(device, resolve_dtype(config.dtype, device))
        check_fp8_shapes(read_model_config(config.model_dir, config.load_format), config.tensor_parallel_size)


def quantize(model: DiffusionTransformer, quantization: str, reduce: Reduce | None = None) -> None:
    """Apply `quantization` to a loaded model in place ("none" leaves it as it is).

    `reduce` is a tensor-parallel shard's all-reduce (see `models.fp8.quantize_fp8`).
    """
    if quantization == "fp8":
        quantize_fp8(model, reduce)


def load_model(
    model_dir: str | Path, dtype: str = "auto", device: str = "auto", load_format: str = "auto", quantization: str = "none"
) -> LoadedModel:
    """Load config, weights and tokenizer of a local LLaDA/Dream checkpoint directory.

    `load_format="dummy"` reads only `config.json` and the tokenizer and draws
    the weights at random (N(0, 0.02)) on the device, for load tests.
    `quantization="fp8"` quantizes the projections after loading (`models.fp8`).
    """
    config = read_model_config(model_dir, load_format)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_quantization(quantization, dev, torch_dtype)
    tokenizer = load_tokenizer(model_dir)
    if load_format == "dummy":
        model = random_weights(config, torch_dtype, dev)
    else:
        model = load_weights(model_dir, torch_dtype, dev)
    quantize(model, quantization)
    return LoadedModel(model, config, tokenizer, dev, torch_dtype)

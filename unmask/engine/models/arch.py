"""How one checkpoint family names its config fields and tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from unmask.engine.models.config import ModelConfig


@dataclass(frozen=True)
class Architecture:
    """A family's translation between its Hugging Face layout and `ModelConfig`.

    `tensor_names(cfg)` maps our parameter names (those of
    `DiffusionTransformer.state_dict()`) to the checkpoint's tensor names.
    """

    model_types: tuple[str, ...]
    parse_config: Callable[[dict], ModelConfig]
    to_hf_config: Callable[[ModelConfig], dict]
    tensor_names: Callable[[ModelConfig], dict[str, str]]


class CheckpointError(ValueError):
    """A model directory cannot be loaded; the message says what is wrong."""


def require(hf: dict, key: str):
    """The config field `key`, or a clear error naming it."""
    if key not in hf:
        raise CheckpointError(f"config.json lacks the field {key!r}")
    return hf[key]

"""How one checkpoint family names its config fields and tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from unmask.engine.models.config import ModelConfig


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of the checkpoint tensor `key`: one of our parameters stored fused with others
    in one tensor (LLaDA2's `query_key_value` holds q, k and v)."""

    key: str
    start: int
    stop: int


@dataclass(frozen=True)
class Architecture:
    """A family's translation between its Hugging Face layout and `ModelConfig`.

    `tensor_names(cfg)` maps our parameter names (those of
    `DiffusionTransformer.state_dict()`) to the checkpoint's tensor names, or
    to `Rows` of one where the checkpoint fuses several of our parameters.
    `claims(hf)`, if given, says whether a config of one of `model_types` that
    another family shares is this family's (LLaDA-MoE's `llada` with experts).
    """

    model_types: tuple[str, ...]
    parse_config: Callable[[dict], ModelConfig]
    to_hf_config: Callable[[ModelConfig], dict]
    tensor_names: Callable[[ModelConfig], dict[str, str | Rows]]
    claims: Callable[[dict], bool] | None = None


class CheckpointError(ValueError):
    """A model directory cannot be loaded; the message says what is wrong."""


def require(hf: dict, key: str):
    """The config field `key`, or a clear error naming it."""
    if key not in hf:
        raise CheckpointError(f"config.json lacks the field {key!r}")
    return hf[key]

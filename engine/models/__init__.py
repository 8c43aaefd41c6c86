"""Native PyTorch LLaDA and Dream models and their checkpoint loader."""

from engine.models.arch import CheckpointError
from engine.models.config import ModelConfig
from engine.models.loader import LoadedModel, load_model
from engine.models.transformer import DiffusionTransformer

__all__ = ["CheckpointError", "DiffusionTransformer", "LoadedModel", "ModelConfig", "load_model"]

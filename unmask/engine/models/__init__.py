"""Native PyTorch LLaDA and Dream models and their checkpoint loader."""

from unmask.engine.models.arch import CheckpointError
from unmask.engine.models.config import ModelConfig
from unmask.engine.models.loader import LoadedModel, load_model
from unmask.engine.models.transformer import DiffusionTransformer

__all__ = ["CheckpointError", "DiffusionTransformer", "LoadedModel", "ModelConfig", "load_model"]

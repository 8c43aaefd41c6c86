"""Unmask's engine: everything between a request and the GPU (see DESIGN.md §3)."""

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.outputs import BlockView, FinishReason, RequestOutput, RequestStats, StepStats
from engine.params import EngineDefaults, ParamError, SamplingParams

__all__ = [
    "LLM", "AsyncEngine", "BlockView", "EngineConfig", "EngineDefaults", "FinishReason", "LLMEngine",
    "ParamError", "RequestOutput", "RequestStats", "SamplingParams", "StepStats",
]

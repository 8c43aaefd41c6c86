"""Unmask's engine: everything between a request and the GPU (see DESIGN.md §3).

The public names are imported on first use, not here: importing a light module
such as `engine.params` (the CLI parser does) must not pull in torch.
"""

from importlib import import_module

_HOMES = {
    "LLM": "engine.llm",
    "AsyncEngine": "engine.async_engine",
    "BlockView": "engine.outputs",
    "EngineConfig": "engine.config",
    "EngineDefaults": "engine.params",
    "FinishReason": "engine.outputs",
    "LLMEngine": "engine.engine",
    "ParamError": "engine.params",
    "RequestOutput": "engine.outputs",
    "RequestStats": "engine.outputs",
    "SamplingParams": "engine.params",
    "StepStats": "engine.outputs",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)

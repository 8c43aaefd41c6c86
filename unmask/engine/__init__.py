"""Unmask's engine: everything between a request and the GPU (see docs/ARCHITECTURE.md).

The public names are imported on first use, not here: importing a light module
such as `engine.params` (the CLI parser does) must not pull in torch.
"""

from importlib import import_module

_HOMES = {
    "LLM": "unmask.engine.llm",
    "AsyncEngine": "unmask.engine.async_engine",
    "BlockView": "unmask.engine.outputs",
    "EngineConfig": "unmask.engine.config",
    "EngineDefaults": "unmask.engine.params",
    "FinishReason": "unmask.engine.outputs",
    "Infill": "unmask.engine.infill",
    "LLMEngine": "unmask.engine.engine",
    "ParamError": "unmask.engine.params",
    "RequestOutput": "unmask.engine.outputs",
    "RequestStats": "unmask.engine.outputs",
    "SamplingParams": "unmask.engine.params",
    "StepStats": "unmask.engine.outputs",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'unmask.engine' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)

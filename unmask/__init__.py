"""Unmask: an OpenAI-compatible inference server for diffusion language models.

`from unmask import LLM, SamplingParams` is the offline API; `unmask.engine`,
`unmask.server` and `unmask.kernels` are the layers beneath it (docs/ARCHITECTURE.md).
The names are imported on first use, so `import unmask` does not pull in torch.
"""

from importlib import import_module

_HOMES = {
    "LLM": "unmask.engine.llm",
    "AsyncEngine": "unmask.engine.async_engine",
    "EngineConfig": "unmask.engine.config",
    "LLMEngine": "unmask.engine.engine",
    "RequestOutput": "unmask.engine.outputs",
    "SamplingParams": "unmask.engine.params",
    "Infill": "unmask.engine.infill",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'unmask' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)

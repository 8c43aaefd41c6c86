"""Unmask: an OpenAI-compatible inference server for diffusion language models.

`from unmask import LLM, SamplingParams` is the offline API; `unmask.engine`,
`unmask.server` and `unmask.kernels` are the layers beneath it (docs/ARCHITECTURE.md).
The names come from `unmask.engine`, which imports them on first use, so
`import unmask` does not pull in torch.
"""

from unmask import engine as _engine

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "Infill", "LLMEngine", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'unmask' has no attribute {name!r}")
    return getattr(_engine, name)

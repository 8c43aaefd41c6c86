"""Errors the engine raises to its callers (the server maps each to an HTTP status).

Torch-free (the scheduler raises these): `CheckpointError`, whose home needs
torch, is imported on first use.
"""

from unmask.engine.params import ParamError


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped or is shutting down; no new requests are accepted."""


__all__ = ["CheckpointError", "EngineDeadError", "ParamError", "QueueFullError"]


def __getattr__(name: str):
    if name == "CheckpointError":
        from unmask.engine.models.arch import CheckpointError

        return CheckpointError
    raise AttributeError(f"module 'unmask.engine.errors' has no attribute {name!r}")

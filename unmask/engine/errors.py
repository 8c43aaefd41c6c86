"""Errors the engine raises to its callers (the server maps each to an HTTP status)."""

from unmask.engine.models.arch import CheckpointError
from unmask.engine.params import ParamError


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped or is shutting down; no new requests are accepted."""


__all__ = ["CheckpointError", "EngineDeadError", "ParamError", "QueueFullError"]

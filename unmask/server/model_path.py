"""Where `unmask serve` finds its model when no directory is given."""

from __future__ import annotations

import os
from pathlib import Path

from unmask.engine.bundled import bundled_model_candidates

MODEL_ENV = "UNMASK_MODEL"
BUNDLED_NAME = "unmask-tiny"


def default_model_candidates() -> list[Path]:
    """In order: $UNMASK_MODEL, the checkout's models/ (also right for editable installs),
    and the data directory of an installed package (<prefix>/share/unmask/models/)."""
    candidates = []
    if os.environ.get(MODEL_ENV):
        candidates.append(Path(os.environ[MODEL_ENV]).expanduser())
    candidates.extend(bundled_model_candidates(BUNDLED_NAME))
    return candidates


def resolve_model_dir(given: str | None) -> Path:
    """The checkpoint directory to serve; raises FileNotFoundError saying where it looked."""
    candidates = [Path(given).expanduser()] if given else default_model_candidates()
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no model checkpoint (a directory with config.json) at: {tried}")

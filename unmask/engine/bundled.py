"""Where the bundled checkpoints (`models/` of the repository) are found.

A checkout (or an editable install) has them in the repository's `models/`; an
installed wheel carries them as data files under `<prefix>/share/unmask/models/`
(pyproject's `data-files`), as does the Docker image.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT_MODELS = Path(__file__).resolve().parents[2] / "models"


def bundled_model_candidates(name: str) -> list[Path]:
    """The places a bundled checkpoint called `name` may be, in the order they are tried."""
    return [CHECKOUT_MODELS / name, Path(sys.prefix) / "share" / "unmask" / "models" / name]


def bundled_model_dir(name: str) -> Path:
    """The first candidate holding a `config.json` (or a `tokenizer.json`), else the checkout's path."""
    for path in bundled_model_candidates(name):
        if (path / "config.json").is_file() or (path / "tokenizer.json").is_file():
            return path
    return CHECKOUT_MODELS / name

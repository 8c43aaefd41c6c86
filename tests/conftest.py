"""Shared fixtures: small random checkpoints of both layouts, and engines over them."""

from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread per process: the suite runs servers, clients and engines side by
# side on two cores, where OpenMP's spinning threads slow a small op tenfold.
# Servers started by tests inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from unmask.engine.models.make_random import make_random_checkpoint

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "unmask-tiny"


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("llada"), arch="llada", layers=2, hidden=64, heads=4)


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("dream"), arch="dream", layers=2, hidden=64, heads=4, kv_heads=2)


@pytest.fixture(scope="session", params=["llada", "dream"])
def model_dir(request, llada_dir, dream_dir) -> Path:
    return llada_dir if request.param == "llada" else dream_dir


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    if not (BUNDLED_MODEL / "config.json").is_file():
        pytest.skip("the bundled model models/unmask-tiny is not in this checkout")
    return BUNDLED_MODEL

"""A non-editable install from the lock, as a user gets it, beside Hugging Face's own `kernels`.

The project is built as a wheel into a fresh virtualenv that holds exactly
requirements.lock (transformers >= 5.25 and its top-level `kernels` package
among them), and `unmask serve` is started from a folder outside the checkout
with no model argument: it must find the bundled model that the wheel carries
and answer one of its tasks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from packaging.version import Version
from server_fixtures import wait_until
from test_server_cli import wait_for_url

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "unmask", "models")
SORT_PROMPT = "Sort these numbers from smallest to largest: 42, 7, 19"

pytestmark = pytest.mark.slow


def _locked_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _copy_sources(dest: Path) -> None:
    """The files a wheel is built from, outside the checkout (the build writes build/ beside them)."""
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv with the lock and the project's wheel in it; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-r", str(REPO / "requirements.lock")], check=True)
    source = root / "source"
    source.mkdir()
    _copy_sources(source)
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(source)], check=True)
    return venv / "bin"


def _python(bin_dir: Path, code: str, cwd: Path) -> str:
    return subprocess.run(
        [str(bin_dir / "python"), "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_lock_pins_a_transformers_that_brings_hugging_faces_kernels():
    pins = _locked_versions()
    assert Version(pins["transformers"]) >= Version("5.25")
    assert "kernels" in pins


def test_the_install_puts_only_the_unmask_namespace_beside_hugging_faces_kernels(installed, tmp_path):
    found = _python(
        installed,
        "import importlib.util as u, kernels, transformers, unmask.kernels;"
        "print([n for n in ('engine', 'server') if u.find_spec(n)], kernels.__name__, hasattr(kernels, 'get_kernel'),"
        " unmask.kernels.__file__.startswith(__import__('sys').prefix))",
        cwd=tmp_path,
    )
    assert found == "[] kernels True True"


def test_installed_server_answers_from_outside_the_checkout_with_the_bundled_model(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UNMASK_MODEL", "UNMASK_API_KEY")}
    proc = subprocess.Popen(
        [str(installed / "unmask"), "serve", "--port", "0"],
        cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        name, url = wait_for_url(proc)
        assert wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, timeout=120)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": name, "max_tokens": 32, "messages": [{"role": "user", "content": SORT_PROMPT}],
        })
        assert reply.status_code == 200, reply.text
        assert name == "unmask-tiny"
        assert reply.json()["choices"][0]["message"]["content"] == "Answer: 7, 19, 42"
    finally:
        proc.terminate()
        assert proc.wait(timeout=120) == 0

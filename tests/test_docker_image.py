"""The CPU image, built from the project's Dockerfile and run the way a user runs it.

The build is the README's CPU `docker build` of this checkout, with the Dockerfile as it
ships. Only build arguments are local: the base is Debian made on this machine
(offline_docker.py: no registry is needed), and where PyTorch's CPU index cannot be
reached, PyPI is the torch index and the CPU wheel comes from this machine's pip sources,
which the base carries. Docker's layer cache keeps a rebuild to the layers a change touched.

Skipped, with the reason, where no Docker daemon answers and none can be started here.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from offline_docker import DockerUnavailable, docker, ensure_build_base, image_id, start_daemon

REPO = Path(__file__).resolve().parent.parent
CPU_IMAGE = "unmask:cpu-test"
SMOKE_TEST = REPO / "deploy" / "docker" / "smoke_test.sh"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu/torch/"

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1500)]


def _readme_cpu_build_args() -> dict[str, str]:
    """The build arguments of the README's CPU `docker build` command."""
    readme = (REPO / "README.md").read_text()
    docker_section = readme[readme.index("### Docker\n"):]
    command = next(line for line in docker_section.splitlines() if line.startswith("docker build") and "VARIANT=cpu" in line)
    words = shlex.split(command, comments=True)
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--build-arg")


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _local_build_args(base: str) -> dict[str, str]:
    """The base made here; and, where PyTorch's CPU index cannot be reached, PyPI as the torch index.

    Then the CPU wheel comes from this machine's pip sources, which the base carries.
    """
    args = {"BASE_IMAGE": base}
    if not _reachable(PYTORCH_CPU_INDEX):
        args["TORCH_INDEX_URL"] = "https://pypi.org/simple"
    return args


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory):
    try:
        daemon = start_daemon(tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    except DockerUnavailable as exc:
        pytest.skip(str(exc))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def cpu_image(docker_daemon, tmp_path_factory) -> str:
    """CPU_IMAGE built from this checkout by the README's command, on the local base; the build it replaces is removed."""
    try:
        base = ensure_build_base(tmp_path_factory.mktemp("docker-base"))
    except DockerUnavailable as exc:
        pytest.skip(str(exc))
    build_args = _readme_cpu_build_args() | _local_build_args(base)
    assert build_args["VARIANT"] == "cpu"
    previous = image_id(CPU_IMAGE)
    docker("build", "--network", "host", "-t", CPU_IMAGE,
           *(arg for name, value in build_args.items() for arg in ("--build-arg", f"{name}={value}")), str(REPO))
    if previous and previous != image_id(CPU_IMAGE):
        docker("rmi", previous, check=False)  # untagged now; a container still using it keeps it
    return CPU_IMAGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _locked_versions(lock: Path) -> dict[str, Version]:
    pins = (line.split("==") for line in lock.read_text().splitlines() if "==" in line and not line.startswith("#"))
    return {canonicalize_name(name): Version(version) for name, version in pins}


def test_the_cpu_image_passes_the_smoke_test(cpu_image):
    if shutil.which("curl") is None:
        pytest.skip("deploy/docker/smoke_test.sh talks to the container with curl, which is not installed")
    result = subprocess.run(["bash", str(SMOKE_TEST), cpu_image, str(_free_port())],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: unmask-tiny answers: Answer: 7, 19, 42" in result.stdout
    assert result.stdout.rstrip().endswith(f"PASS: {cpu_image}")


def test_the_cpu_image_holds_exactly_the_locked_dependencies(cpu_image):
    freeze = docker("run", "--rm", "--entrypoint", "pip", cpu_image, "freeze", "--all").stdout
    installed = {}
    for line in freeze.splitlines():
        name, _, version = line.partition("==")
        if version:
            installed[canonicalize_name(name)] = Version(version)
    locked = _locked_versions(REPO / "requirements.lock")
    # torch's local label names its build (2.13.0+cpu); the lock pins the public version.
    assert {name: version.public for name, version in installed.items() if name in locked} == {
        name: version.public for name, version in locked.items()}
    assert set(installed) - set(locked) == {"pip"}, "installed beside the lock (the project itself is `unmask @ file`)"

"""A Docker daemon, and a base image that the project's Dockerfile builds on without a registry.

Container registries may be unreachable where the tests run, so no `FROM` image can be
pulled. The base is made from Debian's own packages instead: `debootstrap` from the mirror
apt uses, imported as DEBIAN_IMAGE (the slow part, done once per machine and reused by
tag). On it goes a small layer with this machine's extra CA certificates and pip
configuration (its files, its PIP_* variables and the local paths they name, such as a
folder of wheels), so the build's pip reaches the same package sources as the host's pip
does. That layer's tag is a digest of what it holds, so a changed configuration makes a
new one. Builds use the legacy builder (`DOCKER_BUILDKIT=0`, the one a docker CLI without
buildx has) on the host's network (`--network host`: a daemon started with
`--iptables=false` gives containers no route out).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEBIAN_RELEASE = "bookworm"
DEBIAN_IMAGE = f"local/debian:{DEBIAN_RELEASE}"
BUILD_BASE_REPOSITORY = "local/unmask-build-base"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
DAEMON_START_SECONDS = 30


class DockerUnavailable(Exception):
    """Why images cannot be built here (the test skips with it)."""


def docker(*args: str, check: bool = True, timeout: float = 1200, **kwargs) -> subprocess.CompletedProcess:
    """The docker CLI with the legacy builder; output captured as text."""
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    result = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def image_id(tag: str) -> str | None:
    result = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False, timeout=60)
    return result.stdout.strip() if result.returncode == 0 else None


# --------------------------------------------------------------------------- the daemon
@dataclass
class DockerDaemon:
    """A daemon that answers; `process` is set when this module started it (and stops it)."""

    process: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _daemon_answers() -> bool:
    return docker("info", check=False, timeout=30).returncode == 0


def start_daemon(log: Path) -> DockerDaemon:
    """The running daemon, or one started here as root with Debian's dockerd; else DockerUnavailable."""
    if shutil.which("docker") is None:
        raise DockerUnavailable("the docker CLI is not installed (Debian package: docker.io)")
    if _daemon_answers():
        return DockerDaemon()
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if dockerd is None:
        raise DockerUnavailable("no Docker daemon answers and dockerd is not installed (Debian package: docker.io)")
    if os.geteuid() != 0:
        raise DockerUnavailable("no Docker daemon answers and starting dockerd needs root")
    with open(log, "w") as log_file:
        process = subprocess.Popen([dockerd, "--storage-driver=overlay2", "--iptables=false"],
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = DockerDaemon(process)
    deadline = time.monotonic() + DAEMON_START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        if _daemon_answers():
            return daemon
        time.sleep(0.5)
    daemon.stop()
    raise DockerUnavailable(f"dockerd did not start within {DAEMON_START_SECONDS} s: {log.read_text()[-600:]}")


# --------------------------------------------------------------------------- Debian from its packages
def debian_mirror() -> str:
    """The Debian archive apt on this machine uses (the main suite, not -security or -updates)."""
    if shutil.which("apt-get") is None:
        return FALLBACK_MIRROR
    result = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(SUITE) $(TARGET_OF)"],
                            capture_output=True, text=True)
    for line in result.stdout.splitlines():
        uri, suite, target_of = line.split()
        if target_of == "deb" and "-" not in suite and "/debian" in uri:
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def ensure_debian_image(workdir: Path) -> str:
    """DEBIAN_IMAGE, made with debootstrap and `docker import` unless the daemon has it."""
    if image_id(DEBIAN_IMAGE):
        return DEBIAN_IMAGE
    if shutil.which("debootstrap") is None:
        raise DockerUnavailable(f"{DEBIAN_IMAGE} is not built and debootstrap is not installed (Debian package: debootstrap)")
    if os.geteuid() != 0:
        raise DockerUnavailable(f"{DEBIAN_IMAGE} is not built and debootstrap needs root")
    rootfs = workdir / "debian-rootfs"
    try:
        result = subprocess.run(["debootstrap", "--variant=minbase", "--include=ca-certificates", DEBIAN_RELEASE,
                                 str(rootfs), debian_mirror()], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise DockerUnavailable(f"debootstrap {DEBIAN_RELEASE} failed: {(result.stdout + result.stderr)[-600:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        docker("import", "-", DEBIAN_IMAGE, stdin=tar.stdout, timeout=600)
        assert tar.wait() == 0, "tar of the debootstrap root failed"
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return DEBIAN_IMAGE


# --------------------------------------------------------------------------- this machine's CA and pip setup
@dataclass
class HostPackageSetup:
    """What the build's pip needs from this machine, copied to the same paths in the base."""

    paths: list[Path]
    pip_environment: dict[str, str]

    def digest(self, base_id: str) -> str:
        hasher = hashlib.sha256(base_id.encode())
        hasher.update(json.dumps(sorted(self.pip_environment.items())).encode())
        for path in self.paths:
            for file in sorted(p for p in [path, *path.rglob("*")] if p.is_file()):
                stat = file.stat()
                hasher.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return hasher.hexdigest()[:12]


def _pip_config(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "pip", "config", *args], capture_output=True, text=True).stdout


def host_package_setup() -> HostPackageSetup:
    """Extra CA certificates, pip's configuration files and the local files and folders their values name.

    file:// indexes are left out (a missing one only draws a warning from pip); the
    package index itself is reached over the network.
    """
    files = [Path(p) for p in re.findall(r"^\s+(/\S+), exists: True$", _pip_config("debug"), re.M)]
    values = re.findall(r"^\S+?='(.*)'$", _pip_config("list"), re.M)
    named = [Path(word) for value in values for word in value.split() if word.startswith("/")]
    paths = [EXTRA_CA_DIR] if EXTRA_CA_DIR.is_dir() else []
    for path in files + named:
        if path.exists() and path not in paths:
            paths.append(path)
    environment = {key: value for key, value in os.environ.items() if key.startswith("PIP_")}
    return HostPackageSetup(paths, environment)


def _base_dockerfile(debian: str, setup: HostPackageSetup) -> str:
    lines = [f"FROM {debian}", "COPY rootfs/ /"]
    lines += [f"ENV {key}={json.dumps(value)}" for key, value in sorted(setup.pip_environment.items())]
    lines.append("RUN update-ca-certificates")
    return "\n".join(lines) + "\n"


def ensure_build_base(workdir: Path) -> str:
    """The tag of Debian plus this machine's CA certificates and pip setup, built if missing."""
    debian = ensure_debian_image(workdir)
    setup = host_package_setup()
    tag = f"{BUILD_BASE_REPOSITORY}:{setup.digest(image_id(debian) or debian)}"
    if image_id(tag):
        return tag
    context = Path(tempfile.mkdtemp(prefix="build-base-", dir=workdir))
    try:
        (context / "rootfs").mkdir()
        for path in setup.paths:
            target = context / "rootfs" / path.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, target, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)
        (context / "Dockerfile").write_text(_base_dockerfile(debian, setup))
        docker("build", "--network", "host", "-t", tag, str(context))
    finally:
        shutil.rmtree(context, ignore_errors=True)
    return tag

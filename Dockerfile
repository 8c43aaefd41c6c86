# Unmask server image. Two variants from one file:
#
#   docker build -t unmask .                                     # GPU: CUDA runtime base, CUDA torch
#   docker build -t unmask:cpu --build-arg VARIANT=cpu --build-arg BASE_IMAGE=debian:bookworm-slim .
#
#   docker run --gpus all -p 8000:8000 unmask                   # serves the bundled model at once
#   docker run --gpus all -p 8000:8000 -v /data/LLaDA-8B-Instruct:/models/llada:ro unmask /models/llada
#
# The entrypoint is `unmask serve --host 0.0.0.0 --port 8000`; arguments after the image
# name are appended (a model directory, then any `unmask serve` option).
#
# The base image is a build argument rather than one stage per variant: Docker's legacy
# builder builds every stage of a file, so a CPU build would otherwise pull the CUDA base.
# Any Debian or Ubuntu image serves; Python comes from its own packages.
#
# PyPI's torch 2.13 Linux wheels are CUDA 13.0 builds, so the GPU base is CUDA 13.0 and
# the host needs an NVIDIA driver >= 580. For an older driver pick matching pairs, e.g.
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# gpu: CUDA torch, and the C toolchain Triton compiles its kernel launchers with the first
# time a kernel runs. cpu: PyTorch's CPU-only build (no CUDA libraries, a fraction of the size).
ARG VARIANT=gpu
# An extra package index for torch. Its local-labelled build of the locked version
# (2.13.0+cpu, 2.13.0+cu128) ranks above PyPI's plain 2.13.0, so pip takes it from there.
# Empty: the variant's own (cpu: PyTorch's CPU index; gpu: none, PyPI's build is CUDA's).
ARG TORCH_INDEX_URL=

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python from the base's own packages, the venv, and the user the server runs as: a fixed
# numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN case "$VARIANT" in \
        gpu) toolchain="python3-dev gcc libc6-dev" ;; \
        cpu) toolchain="" ;; \
        *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates $toolchain \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && groupadd --system --gid 10001 unmask \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/unmask --shell /usr/sbin/nologin unmask

# The locked dependencies (exact versions, what CI tested) before the source, so that
# editing the source does not reinstall them. The lock holds setuptools, the build backend
# of the install step below.
COPY requirements.lock /tmp/requirements.lock
RUN case "$VARIANT" in cpu) variant_index=https://download.pytorch.org/whl/cpu ;; *) variant_index= ;; esac \
 && torch_index="${TORCH_INDEX_URL:-$variant_index}" \
 && pip install -r /tmp/requirements.lock ${torch_index:+--extra-index-url "$torch_index"} \
 && rm /tmp/requirements.lock

# The source last: it changes most often. The package carries the bundled checkpoints as
# data files to <prefix>/share/unmask/models/, where the server looks for them, so
# `unmask serve` with no model argument serves models/unmask-tiny.
COPY pyproject.toml README.md /tmp/unmask/
COPY models/ /tmp/unmask/models/
COPY unmask/ /tmp/unmask/unmask/
RUN pip install --no-deps --no-build-isolation /tmp/unmask \
 && rm -rf /tmp/unmask

USER 10001:10001
WORKDIR /home/unmask

EXPOSE 8000
# /health is 200 only while the engine loop is alive. The start period covers loading a
# large checkpoint; the check itself needs nothing but the image's Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

# SIGTERM (docker stop, Kubernetes) stops accepting connections and lets in-flight
# requests finish before the process exits 0; give it a grace period (compose: 60 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["unmask", "serve", "--host", "0.0.0.0", "--port", "8000"]

# syntax=docker/dockerfile:1
#
# Unmask server image. Two variants from one file:
#
#   docker build -t unmask .                              # GPU: CUDA runtime base, CUDA torch
#   docker build -t unmask:cpu --build-arg VARIANT=cpu .  # CPU only: slim Python base, CPU torch
#
#   docker run --gpus all -p 8000:8000 unmask             # serves the bundled model at once
#   docker run --gpus all -p 8000:8000 -v /data/LLaDA-8B-Instruct:/models/llada:ro unmask /models/llada
#
# The entrypoint is `unmask serve --host 0.0.0.0 --port 8000`; arguments after the image
# name are appended (a model directory, then any `unmask serve` option).
#
# PyPI's torch 2.13 Linux wheels are CUDA 13.0 builds, so the GPU base is CUDA 13.0 and
# the host needs an NVIDIA driver >= 580. For an older driver pick matching pairs, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ARG VARIANT=gpu
ARG TORCH_VERSION=2.13.0
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# ---- GPU base: CUDA runtime, the distribution's Python, CUDA torch ----------------------
FROM ${CUDA_IMAGE} AS base-gpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://pypi.org/simple
# gcc, libc headers and Python headers: Triton compiles its small kernel launchers with
# them the first time a kernel runs.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# ---- CPU base: slim Python, CPU-only torch (no CUDA libraries, a fraction of the size) --
FROM ${CPU_IMAGE} AS base-cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# ---- the runtime dependencies of pyproject.toml as a requirements file -------------------
# Its own stage: the install layer below is keyed on this file's content, so editing other
# parts of pyproject.toml (test extras, tool settings) keeps the installed dependencies cached.
FROM base-${VARIANT} AS requirements
COPY pyproject.toml /tmp/unmask/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/unmask/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /requirements.txt

# ---- the server, on whichever base VARIANT names ----------------------------------------
FROM base-${VARIANT} AS runtime
ARG VARIANT
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UNMASK_IMAGE_VARIANT=${VARIANT}

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 unmask \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/unmask --shell /usr/sbin/nologin unmask

# Dependencies before the source, so that editing the source does not reinstall them.
# setuptools is the build backend of the install step below.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt "setuptools>=68" \
 && rm /tmp/requirements.txt

# The bundled checkpoints go where an installed Unmask looks for them
# (<prefix>/share/unmask/models/, see server/model_path.py), so `unmask serve`
# with no model argument serves models/unmask-tiny.
COPY models/ /opt/venv/share/unmask/models/

# The source last: it changes most often.
COPY pyproject.toml README.md /tmp/unmask/
COPY engine/ /tmp/unmask/engine/
COPY kernels/ /tmp/unmask/kernels/
COPY server/ /tmp/unmask/server/
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

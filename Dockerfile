# syntax=docker/dockerfile:1
#
# patchpack: SigLIP 2 NaFlex embedding service.
#
#   GPU image (default): docker build -t patchpack .
#   CPU image:           docker build -t patchpack:cpu \
#                          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   Run on a GPU node:   docker run --gpus all -p 8000:8000 -v patchpack-models:/models patchpack
#
# Base image: python:3.11-slim, not nvidia/cuda. torch's Linux CUDA wheels ship the CUDA
# runtime, cuBLAS and cuDNN as pip packages, and the NVIDIA container toolkit injects the host
# driver (libcuda) at run time, so an nvidia/cuda runtime base would only add a second,
# possibly mismatched, copy of the same libraries. The slim base also lets the very same
# Dockerfile produce the CPU image.
#
# No C compiler is installed in the runtime stage: the service runs eager kernels. Anything
# that JIT-compiles at run time (torch.compile / Triton) would need `gcc` added there.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# One self-contained venv is the only thing the runtime stage copies: build tools, pip's cache
# and the sources stay behind.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and on its own layer: it is by far the largest download (several GB with CUDA)
# and changes least often. Empty TORCH_INDEX_URL = PyPI, whose Linux x86_64 wheel is the CUDA
# build; https://download.pytorch.org/whl/cpu gives a CPU-only image a fraction of the size,
# .../whl/cu1XX picks a specific CUDA line to match an older host driver.
# The torch chosen here is then frozen as a constraint: were a dependency below to ask for
# another one, pip would silently swap the CPU build for PyPI's CUDA build (or back); with
# the constraint the build fails instead.
ARG TORCH_INDEX_URL=""
ARG TORCH_SPEC="torch>=2.9"
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi \
    && pip freeze | grep -i '^torch==' > /tmp/torch-constraint.txt

# Dependencies next, keyed on pyproject.toml alone, so editing app/ does not re-download them.
# They are read with tomllib rather than by installing the project, which would need the
# sources in this layer.
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; \
deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project'].get('dependencies', []); \
print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install -c /tmp/torch-constraint.txt -r /tmp/requirements.txt

# The project itself: cheap, no dependency resolution (everything is already in place).
COPY . /src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src \
    && pip check

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="patchpack" \
      org.opencontainers.image.description="Any-resolution image embeddings: SigLIP 2 NaFlex with patch-n'-pack batching" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER, and volume
# ownership (fsGroup, the compose named volume) is set up against it.
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} patchpack \
    && useradd --system --uid ${APP_UID} --gid ${APP_UID} --create-home --home-dir /home/patchpack \
        --shell /usr/sbin/nologin patchpack \
    && install -d -o ${APP_UID} -g ${APP_UID} -m 0755 /models

COPY --from=builder /opt/venv /opt/venv

# HF_HOME on its own path so one volume keeps downloaded weights across restarts.
# XDG_CACHE_HOME / TRITON_CACHE_DIR point under /tmp, the only other writable place when the
# root filesystem is mounted read-only (Kubernetes securityContext, compose read_only).
# NVIDIA_VISIBLE_DEVICES is deliberately not set: "all" baked into an image hands every GPU of
# a node to any pod that runs it, bypassing the device plugin's allocation.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATCHPACK_HOST=0.0.0.0 \
    PATCHPACK_PORT=8000

USER ${APP_UID}:${APP_UID}
WORKDIR /home/patchpack
EXPOSE 8000

# Liveness only (/healthz): the process and its device thread are alive. Readiness (/readyz,
# model loaded and warmed up) is the orchestrator's business. urllib because the slim base has
# no curl; urlopen raises on any non-2xx, which exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PATCHPACK_PORT', '8000'), timeout=4)" || exit 1

# Exec form: patchpack is PID 1 and receives SIGTERM itself, which starts the graceful drain
# (readyz -> 503, admitted work finishes, exit). Settings come from PATCHPACK_* env vars;
# extra `docker run ... patchpack --flag value` arguments are appended as serve flags.
STOPSIGNAL SIGTERM
ENTRYPOINT ["patchpack", "serve"]

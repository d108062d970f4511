# syntax=docker/dockerfile:1
# First sketch (issue 6 completes it): a CPU image with one model baked in at build time, so nothing downloads at run time.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SUPERRES_MODEL_DIR=/opt/superres/models
WORKDIR /opt/superres/app
COPY pyproject.toml README.md ./
COPY handler ./handler
COPY pipeline ./pipeline
COPY models ./models
RUN pip install --no-cache-dir . && useradd --create-home --uid 10001 superres
# MODEL: a catalog name; MODEL_BASE_URL: optional mirror (e.g. a local server in tests). Verified by checksum.
ARG MODEL=edsr-x3
ARG MODEL_BASE_URL=
RUN superres models pull "${MODEL}" ${MODEL_BASE_URL:+--base-url "$MODEL_BASE_URL"} --model-dir /opt/superres/models
ENV SUPERRES_MODEL=${MODEL}
USER superres
WORKDIR /work
ENTRYPOINT ["superres"]
CMD ["info"]

# The tunepool image: one image for every role (`tunepool migrate`, `tunepool api`,
# `tunepool worker`, `tunepool admin ...`, and Celery's Flower). See docs/production.md.
#
#   docker build -t tunepool .                                                   # CPU torch
#   docker build -t tunepool --build-arg TORCH_INDEX_URL=https://pypi.org/simple .  # CUDA torch
#
# Layers go from what changes least to what changes most: torch (GBs), then the dependencies
# listed in pyproject.toml, then tunepool's own source, so an edit to the code rebuilds seconds.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtual environment in /opt/venv with torch, the dependencies and tunepool --------
FROM ${PYTHON_IMAGE} AS build

# The torch build is chosen by the index it comes from. The default, PyTorch's CPU index, makes
# an image for the API and CPU-only machines. GPU nodes need a CUDA build: PyPI's Linux x86_64
# torch wheel is one (it brings the CUDA runtime as nvidia-* wheels; the host needs only the
# driver and the NVIDIA container toolkit), or name a CUDA version with PyTorch's index, e.g.
# https://download.pytorch.org/whl/cu128 (pick one that torch ${TORCH_VERSION} is published for
# and that the hosts' driver supports). docker-compose.yml passes the CUDA default.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# 1. torch first and pinned: pyproject.toml admits torch>=2.6, so pip keeps this build below
#    instead of pulling another one over it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2. the dependencies (and the `prod` extra: Flower), read from pyproject.toml alone, so this
#    layer is rebuilt only when pyproject.toml changes.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["prod"]))' > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# 3. tunepool itself (a regular, non-editable install; /src is not part of the final image).
COPY README.md ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install ".[prod]"

# -- runtime: the virtual environment on a clean base, run as an unprivileged user -----------
FROM ${PYTHON_IMAGE}

# A fixed uid, the same on every node, so files on shared artifact storage (NFS) have one owner.
ARG TUNEPOOL_UID=1000

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TUNEPOOL_HOME=/data \
    TUNEPOOL_STORAGE_DIR=/data/artifacts \
    TUNEPOOL_API_HOST=0.0.0.0

# /data/artifacts exists and belongs to tunepool in the image, so a new named volume mounted
# there starts with that owner; /models is where base model files are mounted read-only.
RUN groupadd --gid "${TUNEPOOL_UID}" tunepool \
 && useradd --uid "${TUNEPOOL_UID}" --gid tunepool --create-home --shell /usr/sbin/nologin tunepool \
 && mkdir -p /app /data/artifacts /models \
 && chown tunepool:tunepool /app /data /data/artifacts

COPY --from=build /opt/venv /opt/venv

USER tunepool
WORKDIR /app
EXPOSE 8000
ENTRYPOINT ["tunepool"]
CMD ["--help"]

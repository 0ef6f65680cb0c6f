# syntax=docker/dockerfile:1
#
# Two images from one file (README, "Containers"):
#   api   (default target)  the classification service on CPU torch, with the published BVLC weights baked in
#   train                   `python -m training ...` on CUDA torch, for the GPU machine
#
#   docker build -t alexnet-api .
#   docker build --target train -t alexnet-train .
#
# Build arguments:
#   BASE_IMAGE             debian:bookworm-slim  any Debian 12; its python3 (3.11) runs everything
#   TORCH_VERSION          2.13.0                the project's pin
#   TORCH_INDEX_URL        https://download.pytorch.org/whl/cpu
#                                                where the api image's torch comes from (the CPU build)
#   TRAIN_TORCH_INDEX_URL  https://pypi.org/simple
#                                                where the train image's torch comes from (PyPI's Linux
#                                                wheels are the CUDA build, with CUDA's libraries as wheels)
#   BAKE_WEIGHTS           1                     1: convert the published BVLC AlexNet weights into the api
#                                                image at build time (needs network; without it the build
#                                                says so and the image serves an untrained net); 0: don't
#   WEIGHTS_SOURCE         Caffe's bvlc_alexnet.caffemodel URL (below); the ONNX model zoo's
#                                                bvlcalexnet-12.onnx URL works too (README)
#   WEIGHTS_ARGS           ""                    more model.import_weights flags, e.g. `--expected-sha256
#                                                HEX` for a copy on a mirror under another file name
# Optional build context `wheels` (`--build-context wheels=DIR`): a directory holding a torch wheel for
# CPython 3.11 (torch-<TORCH_VERSION>*-cp311-*.whl) to install instead of downloading one; then neither
# torch index is used. Without the context, the empty stage below stands in for it.

ARG BASE_IMAGE=debian:bookworm-slim
ARG TORCH_VERSION=2.13.0

FROM scratch AS wheels

# ---------------------------------------------------------------------------------------------------------
# Runtime base: Debian's python3, an unprivileged user, and the paths every image shares.
FROM ${BASE_IMAGE} AS runtime-base
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 alexnet \
    && useradd --system --uid 10001 --gid alexnet --home-dir /app --no-create-home --shell /usr/sbin/nologin alexnet \
    && mkdir -p /app /checkpoints /data \
    && chown alexnet:alexnet /checkpoints /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app

# ---------------------------------------------------------------------------------------------------------
# Builder: a virtual environment in /opt/venv with the project's dependencies (no project code yet, so
# this layer is rebuilt only when pyproject.toml or a torch argument changes).
FROM runtime-base AS builder
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY pyproject.toml /tmp/pyproject.toml
# The dependency lists straight from pyproject.toml: one source of truth for the images and `make install`
# (requirements-train.txt: the `train` extra, matplotlib for the curves.png that training draws).
RUN python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies']), file=open('/tmp/requirements.txt', 'w')); \
print('\n'.join(p['optional-dependencies']['train']), file=open('/tmp/requirements-train.txt', 'w'))"

FROM builder AS api-venv
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first and alone: a plain resolver run would fetch PyPI's CUDA build. A torch wheel for this Python
# in the `wheels` context wins over the index; the rest comes from PyPI. (DL3013: "$1" is a wheel file.)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=wheels,target=/wheels \
    set -- /wheels/torch-"${TORCH_VERSION}"*-cp311-*.whl; \
    if [ -e "$1" ]; then pip install --no-deps "$1"; \
    else pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; fi \
    && pip install -r /tmp/requirements.txt \
    # C++ headers and test binaries are for building extensions, never used at run time (~110 MB).
    && rm -rf /opt/venv/lib/python3.11/site-packages/torch/include \
              /opt/venv/lib/python3.11/site-packages/torch/bin/test_* \
              /opt/venv/lib/python3.11/site-packages/torch/bin/*Test \
              /opt/venv/lib/python3.11/site-packages/torch/bin/protoc*

FROM builder AS train-venv
ARG TORCH_VERSION
ARG TRAIN_TORCH_INDEX_URL=https://pypi.org/simple
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=wheels,target=/wheels \
    set -- /wheels/torch-"${TORCH_VERSION}"*-cp311-*.whl; \
    if [ -e "$1" ]; then pip install --no-deps "$1"; \
    else pip install --index-url "$TRAIN_TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; fi \
    && pip install -r /tmp/requirements.txt -r /tmp/requirements-train.txt \
    && rm -rf /opt/venv/lib/python3.11/site-packages/torch/include

# ---------------------------------------------------------------------------------------------------------
# The published weights, converted once at build time. Only a network failure is tolerated (exit 3 from
# the converter): a checksum mismatch or an unreadable file fails the build rather than ship it.
FROM api-venv AS weights
ARG BAKE_WEIGHTS=1
ARG WEIGHTS_SOURCE=http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel
ARG WEIGHTS_ARGS=""
COPY model/ /app/model/
# WEIGHTS_ARGS is split into words on purpose (SC2086).
# hadolint ignore=SC2086
RUN mkdir -p /weights; \
    if [ "$BAKE_WEIGHTS" != 1 ]; then \
        echo "BAKE_WEIGHTS=$BAKE_WEIGHTS: no weights baked in; the API will serve an untrained network"; exit 0; \
    fi; \
    status=0; \
    python -m model.import_weights "$WEIGHTS_SOURCE" $WEIGHTS_ARGS --out /weights/best.safetensors --timeout 30 || status=$?; \
    case "$status" in \
        0) ;; \
        3) echo "WARNING: could not download $WEIGHTS_SOURCE (no network?)."; \
           echo "WARNING: this image will serve an UNTRAINED network (\"trained\": false in every response)."; \
           echo "WARNING: rebuild with network access, or add weights later (README, Containers)." ;; \
        *) exit "$status" ;; \
    esac

# ---------------------------------------------------------------------------------------------------------
# The training job: CUDA torch (GPUs reach it through the NVIDIA container toolkit), model/, training/ and predict/.
FROM runtime-base AS train
COPY --from=train-venv /opt/venv /opt/venv
COPY model/ /app/model/
COPY training/ /app/training/
COPY predict/ /app/predict/
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------
# The API: CPU torch, model/ and service/ only (the service never imports training/).
FROM runtime-base AS api
COPY --from=api-venv /opt/venv /opt/venv
COPY model/ /app/model/
COPY service/ /app/service/
COPY docker/healthcheck.py /usr/local/bin/alexnet-healthcheck
# Baked weights land in /checkpoints: a new named volume mounted there starts with a copy of them, and the
# service hot-reloads when training replaces the file.
COPY --from=weights --chown=alexnet:alexnet /weights/ /checkpoints/
USER 10001:10001
ENV ALEXNET_HOST=0.0.0.0 \
    ALEXNET_PORT=8000 \
    ALEXNET_GRPC_PORT=8001 \
    ALEXNET_CHECKPOINT=/checkpoints/best.safetensors
# HTTP (the API and /v2), and gRPC (inference.GRPCInferenceService, docs/protocol.md)
EXPOSE 8000 8001
# /readyz answers 200 once the model is loaded and warmed up; the first start can take a minute on CPU.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["alexnet-healthcheck"]
CMD ["python", "-m", "service"]

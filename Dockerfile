# The emofleet image: one image for `emofleet process`, `sink`, `aggregate`, `topics`, ... (the command
# is the container's arguments). CUDA build of torch by default; for a CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t emofleet:cpu .
# torch is pinned in pyproject.toml (torch==2.13.0); installing it first from PyTorch's index keeps that
# version (a local label such as +cu128 satisfies ==2.13.0) and `pip install .` then leaves it alone.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/emofleet
ENV PATH=/opt/emofleet/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY emofleet ./emofleet
COPY core ./core
COPY streams ./streams
COPY processors ./processors
COPY schemas ./schemas
COPY sinks ./sinks
COPY infra/__init__.py infra/local_stack.py infra/check_imports.py ./infra/
# fail the build when `pip install .` left out a backend that the code imports lazily (boto3 for s3://, ...)
RUN pip install . && python -P infra/check_imports.py

FROM python:${PYTHON_VERSION}-slim-bookworm
# libsndfile decodes audio, ffmpeg is the fallback for containers it cannot open (processors/audio.py)
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 ffmpeg \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/emofleet /opt/emofleet
RUN useradd --system --create-home --uid 10001 emofleet \
    && mkdir -p /data /uploads && chown emofleet /data /uploads  # /uploads: the gateway's (docker-compose.yml)
USER emofleet
ENV PATH=/opt/emofleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EMOFLEET_DATA_DIR=/data \
    MODELSCOPE_CACHE=/data/models/modelscope \
    HF_HOME=/data/models/huggingface \
    EMOFLEET_OBSERVABILITY_METRICS_PORT=9400 \
    EMOFLEET_OBSERVABILITY_LOG_FORMAT=json
WORKDIR /data
# state, chDB files and the downloaded model (~2 GB, MODELSCOPE_CACHE / HF_HOME above): keep it on a volume so a
# recreated container does not download the model again
VOLUME ["/data"]
EXPOSE 9400
# /healthz: the poll loop turned recently (alive while the model loads: "starting")
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=4 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMOFLEET_OBSERVABILITY_METRICS_PORT', '9400') + '/healthz', timeout=4)"]
ENTRYPOINT ["emofleet"]
CMD ["--help"]

# Classify: batched emotion classification with LiteRT (ai-edge-litert, a dependency of the
# package; TensorFlow is not installed). The model bundle in shared/models/ is packaged with
# the project, so it must hold model.tflite when the image is built; to use another bundle,
# mount it and set ES_CLASSIFY__MODEL to its folder.
# Build from the repository root: docker build -f deploy/docker/classify.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY services /src/services
RUN pip install /src && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent emotion
USER 10001
WORKDIR /tmp

ENV ES_METRICS__HOST=0.0.0.0 \
    ES_METRICS__PORT=9100 \
    ES_CLASSIFY__RUNTIME=litert
EXPOSE 9100
# /healthz is the loop heartbeat; /readyz (Redis answers and the model is loaded) is for
# orchestrators that route or scale on readiness.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]

ENTRYPOINT ["python", "-m", "services.classify"]
CMD ["--config", "/etc/emotion-stream/config.yaml"]

# MQTT output: events, track events and per-camera state (with Home Assistant discovery) to a broker.
# Build from the repository root: docker build -f deploy/docker/mqtt.Dockerfile .
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

# Metrics, /healthz and /readyz (ready = Redis answers and the broker is connected) on 9100.
ENV ES_METRICS__HOST=0.0.0.0 \
    ES_METRICS__PORT=9100
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]

ENTRYPOINT ["python", "-m", "services.mqtt"]
CMD ["--config", "/etc/emotion-stream/config.yaml"]

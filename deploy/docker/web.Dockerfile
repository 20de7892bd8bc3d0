# Web view: the operators' page (cameras with faces, live events, tracks, health, camera admin).
# Build from the repository root: docker build -f deploy/docker/web.Dockerfile .
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

# The page on 8080, metrics, /healthz and /readyz on 9100, all interfaces (inside the container
# network; publish 8080 only where it should be reachable, and set ES_WEB__TOKEN or basic auth).
ENV ES_METRICS__HOST=0.0.0.0 \
    ES_METRICS__PORT=9100 \
    ES_WEB__HOST=0.0.0.0 \
    ES_WEB__PORT=8080
EXPOSE 8080 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]

ENTRYPOINT ["python", "-m", "services.web"]
CMD ["--config", "/etc/emotion-stream/config.yaml"]

# Ingest: reads the cameras and publishes JPEG frames to Redis Streams.
# Build from the repository root: docker build -f deploy/docker/ingest.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY services /src/services
RUN pip install /src && rm -rf /src

# The sample camera of deploy/compose/config.yaml: a real face (scikit-image's astronaut
# photo) panning across the frame, rendered at build time so the image needs no download.
RUN mkdir -p /samples && python -c "from pathlib import Path; from shared.sample import render_frames, write_video; write_video(Path('/samples/astronaut.mp4'), render_frames())"

RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent emotion
USER 10001
WORKDIR /tmp

# Metrics, /healthz and /readyz on all interfaces, port 9100.
ENV ES_METRICS__HOST=0.0.0.0 \
    ES_METRICS__PORT=9100
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=4)"]

ENTRYPOINT ["python", "-m", "services.ingest"]
CMD ["--config", "/etc/emotion-stream/config.yaml"]

"""python -m services.ingest: read cameras and publish frames to Redis Streams."""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry

from services.ingest.settings import IngestSettings
from services.ingest.worker import IngestMetrics, IngestWorker
from shared.health import run_served
from shared.service import service_main
from shared.settings import mask_url
from shared.streams import connect
from shared.worker import Stopper

log = logging.getLogger("services.ingest")


def run(settings: IngestSettings) -> int:
    stopper = Stopper()
    stopper.install()
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    r = connect(settings.redis)
    worker = IngestWorker(settings, r, metrics, stopper)
    log.info("ingest: %d cameras -> %s", len(settings.cameras), mask_url(settings.redis.url))
    return run_served(settings.metrics, registry, worker)


def main(argv: list[str] | None = None) -> int:
    return service_main("python -m services.ingest", __doc__ or "", IngestSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())

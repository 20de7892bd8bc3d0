"""python -m services.detect: find faces in frames and publish 64x64 grey crops."""

from __future__ import annotations

import logging
import sys

import cv2
from prometheus_client import CollectorRegistry

from services.detect.settings import DetectSettings
from services.detect.worker import DetectMetrics, DetectWorker
from shared.detection import make_camera_detector
from shared.health import run_served
from shared.service import service_main
from shared.streams import connect
from shared.worker import Stopper

log = logging.getLogger("services.detect")


def run(settings: DetectSettings) -> int:
    stopper = Stopper()
    stopper.install()
    if settings.detect.opencv_threads:
        cv2.setNumThreads(settings.detect.opencv_threads)
    try:
        detector = make_camera_detector(settings.detector)
    except (ValueError, cv2.error) as exc:
        print(f"config error: detector = {settings.detector.kind!r}: {exc}", file=sys.stderr)
        return 1
    registry = CollectorRegistry()
    metrics = DetectMetrics(registry)
    worker = DetectWorker(settings, connect(settings.redis), detector, metrics, stopper)
    return run_served(settings.metrics, registry, worker)


def main(argv: list[str] | None = None) -> int:
    return service_main("python -m services.detect", __doc__ or "", DetectSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())

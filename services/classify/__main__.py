"""python -m services.classify: batch face crops through the emotion model and publish events."""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry

from services.classify.settings import ClassifySettings
from services.classify.worker import ClassifyMetrics, ClassifyWorker
from shared.classifier import load_classifier
from shared.health import run_served
from shared.model_bundle import BundleError
from shared.service import service_main
from shared.streams import connect
from shared.worker import Stopper

log = logging.getLogger("services.classify")


def run(settings: ClassifySettings) -> int:
    stopper = Stopper()
    stopper.install()
    cfg = settings.classify
    try:
        classifier = load_classifier(cfg.model, cfg.runtime, cfg.threads, flip_tta=cfg.flip_tta,
                                     zoom_tta=None if cfg.zoom_tta is None else tuple(cfg.zoom_tta))
    except (BundleError, ValueError, OSError) as exc:
        print(f"config error: classify.model = '{cfg.model}': {exc}", file=sys.stderr)
        return 1
    registry = CollectorRegistry()
    metrics = ClassifyMetrics(registry)
    worker = ClassifyWorker(settings, connect(settings.redis), classifier, metrics, stopper)
    return run_served(settings.metrics, registry, worker)


def main(argv: list[str] | None = None) -> int:
    return service_main("python -m services.classify", __doc__ or "", ClassifySettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""python -m services.mqtt: publish emotion events, track events and per-camera state to an MQTT broker."""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry

from services.mqtt.settings import MqttSettings
from services.mqtt.worker import MqttMetrics, MqttWorker
from shared.health import run_served
from shared.service import service_main
from shared.settings import mask_url
from shared.streams import connect
from shared.worker import Stopper

log = logging.getLogger("services.mqtt")


def run(settings: MqttSettings) -> int:
    stopper = Stopper()
    stopper.install()
    registry = CollectorRegistry()
    metrics = MqttMetrics(registry)
    worker = MqttWorker(settings, connect(settings.redis), metrics, stopper)
    log.info("publishing to %s under %s/", mask_url(settings.mqtt.url), settings.mqtt.topic_prefix)
    return run_served(settings.metrics, registry, worker)


def main(argv: list[str] | None = None) -> int:
    return service_main("python -m services.mqtt", __doc__ or "", MqttSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())

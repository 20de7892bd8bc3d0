"""Classify's batching against a real Redis: eager runs as soon as the queue is empty; otherwise it waits."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support import RedisServer

from services.classify.settings import ClassifySettings
from services.classify.worker import ClassifyMetrics, ClassifyWorker
from shared.classifier import load_classifier
from shared.events import EventReader
from shared.schema import FIELD, Box, FaceCrop, FacesMsg, encode_faces
from shared.streams import Keys, connect

pytestmark = [pytest.mark.integration]


def worker(server: RedisServer, bundle: Path, eager: bool) -> ClassifyWorker:
    settings = ClassifySettings(redis={"url": server.url}, metrics={"enabled": False},
                                classify={"model": bundle, "runtime": "litert", "eager": eager,
                                          "max_wait_ms": 10_000, "max_batch": 64},
                                tracking={"enabled": False}, streams={"block_ms": 50})
    clf = load_classifier(bundle, "litert")
    return ClassifyWorker(settings, connect(settings.redis), clf, ClassifyMetrics(CollectorRegistry()))


def queue_faces(server: RedisServer, n: int) -> None:
    crop = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8).tobytes()
    r = server.client()
    for seq in range(n):
        msg = FacesMsg(camera="cam", seq=seq, capture_ts=time.time(), detect_ts=time.time(), size=64,
                       faces=(FaceCrop(box=Box(0, 0, 64, 64), crop=crop),))
        r.xadd(Keys().faces, {FIELD: encode_faces(msg)})


@pytest.mark.parametrize("eager", [True, False])
def test_eager_batch_runs_when_the_queue_is_empty(redis_server: RedisServer, model_bundle: Path,
                                                   eager: bool) -> None:
    w = worker(redis_server, model_bundle, eager)
    queue_faces(redis_server, 3)
    w.step()  # one read takes all three (fewer than max_batch asked for)
    events = EventReader(redis_server.client(), start="start", block_ms=10).poll()
    if eager:
        assert sorted(e.seq for e in events) == [0, 1, 2]
    else:
        assert events == [] and len(w._waiting) == 3  # held for max_wait_ms / max_batch
        w.flush()
        assert len(EventReader(redis_server.client(), start="start", block_ms=10).poll()) == 3


def test_stream_gauges_report_length_lag_and_pending(redis_server: RedisServer, model_bundle: Path) -> None:
    w = worker(redis_server, model_bundle, eager=False)
    stream = Keys().faces
    queue_faces(redis_server, 3)
    w.step()  # samples first (nothing delivered yet), then reads all three and holds them

    def value(name: str, **labels: str) -> float | None:
        return w.common.registry.get_sample_value(name, {"stream": stream, **labels})

    assert value("es_stream_length") == 3
    assert value("es_stream_lag", group="classify") == 3 and value("es_stream_pending", group="classify") == 0
    w._last_stats = 0.0
    w._maybe_sample([stream])
    assert value("es_stream_lag", group="classify") == 0 and value("es_stream_pending", group="classify") == 3
    w.flush()  # events published and acked
    w._last_stats = 0.0
    w._maybe_sample([stream])
    assert value("es_stream_pending", group="classify") == 0

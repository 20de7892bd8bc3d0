"""Classify: batches face crops, runs the model, publishes one event per face."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.classify.settings import ClassifySettings
from shared.classifier import Classifier
from shared.health import LATENCY_BUCKETS, CommonMetrics
from shared.schema import (
    FIELD,
    Box,
    DecodeError,
    EventMsg,
    FacesMsg,
    TrackEventMsg,
    decode_faces,
    encode_event,
    encode_track,
    event_id,
)
from shared.streams import CONNECTION_ERRORS, Entry, LivePublisher
from shared.tracking import CameraTracker, Detection
from shared.worker import Stopper, StreamWorker

log = logging.getLogger(__name__)


class ClassifyMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "classify")
        self.batch = Histogram("es_classify_batch_size", "Faces per model call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.inference = Histogram("es_classify_inference_seconds", "Model time per batch",
                                   buckets=LATENCY_BUCKETS, registry=registry)
        self.events = Counter("es_events_total", "Emotion events published", ["camera", "emotion"],
                              registry=registry)
        self.track_events = Counter("es_track_events_total", "Track events published", ["camera", "kind"],
                                    registry=registry)
        self.end_to_end = Histogram("es_end_to_end_seconds", "Capture to event publish", ["camera"],
                                    buckets=LATENCY_BUCKETS, registry=registry)


@dataclass
class Waiting:
    entry: Entry
    msg: FacesMsg
    since: float


class ClassifyWorker(StreamWorker):
    service = "classify"

    def __init__(self, settings: ClassifySettings, r: redis.Redis, classifier: Classifier,
                 metrics: ClassifyMetrics, stopper: Stopper | None = None) -> None:
        super().__init__(settings, r, settings.classify.group, metrics, stopper)
        self.cfg = settings.classify
        self.classifier = classifier
        self.metrics = metrics
        self.metrics.info.info({"service": "classify", "version": self._version(),
                                "model_version": classifier.meta.version, "runtime": classifier.runtime})
        self._waiting: list[Waiting] = []
        self._faces_waiting = 0
        self.tracking = settings.tracking
        self._trackers: dict[str, CameraTracker] = {}
        self._track_base = 0
        self._last_expiry = 0.0
        self.live = LivePublisher(r)

    @staticmethod
    def _version() -> str:
        import shared

        return shared.__version__

    def streams(self) -> list[str]:
        return [self.keys.faces]

    def read_count(self) -> int:
        return max(1, self.cfg.max_batch - self._faces_waiting)

    def block_ms(self) -> int:
        if not self._waiting:
            return self.settings.streams.block_ms
        left = self.cfg.max_wait_ms - (time.monotonic() - self._waiting[0].since) * 1000
        return max(1, int(left))

    def handle(self, entries: list[Entry]) -> None:
        # A read that returned less than it asked for emptied the queue: waiting longer would
        # only add latency (LiteRT runs a face as fast alone as in a batch of 64).
        queue_empty = len(entries) < self.read_count()
        bad: list[tuple[Entry, DecodeError]] = []
        for entry in entries:
            try:
                msg = decode_faces(entry.payload or b"")
            except DecodeError as exc:
                bad.append((entry, exc))
                continue
            self._waiting.append(Waiting(entry, msg, time.monotonic()))
            self._faces_waiting += len(msg.faces)
        if bad:
            pipe = self.r.pipeline(transaction=False)
            for bad_entry, error in bad:
                self.dead_letter(pipe, bad_entry, error.reason, error.detail)
            pipe.execute()
        if self._faces_waiting >= self.cfg.max_batch or self._due() or (self.cfg.eager and queue_empty):
            self.flush()

    def idle(self) -> None:
        if self._due():
            self.flush()
        elif self.tracking.enabled and time.monotonic() - self._last_expiry > 0.5:
            self._expire_tracks()

    def drain(self) -> None:
        if self._waiting:
            log.info("draining %d waiting face messages", len(self._waiting))
            self.flush()
        # Tracks live in this process: end them, so consumers see every track close.
        ended = [e for t in self._trackers.values() for e in t.flush()]
        if ended:
            pipe = self.r.pipeline(transaction=False)
            self._queue_tracks(pipe, ended)
            pipe.execute()
            self.live.flush()

    def _due(self) -> bool:
        return bool(self._waiting) and (time.monotonic() - self._waiting[0].since) * 1000 >= self.cfg.max_wait_ms

    def flush(self) -> None:
        waiting, self._waiting, self._faces_waiting = self._waiting, [], 0
        crops = [np.frombuffer(f.crop, dtype=np.uint8).reshape(w.msg.size, w.msg.size)
                 for w in waiting for f in w.msg.faces]
        probs = np.zeros((0, len(self.classifier.classes)), dtype=np.float32)
        if crops:
            started = time.perf_counter()
            try:
                probs = self.classifier.predict(np.stack(crops))
            except Exception as exc:  # a failing batch is dead-lettered, the worker goes on
                log.exception("inference failed on %d faces", len(crops))
                self._reject_all(waiting, f"{type(exc).__name__}: {exc}")
                return
            self.metrics.inference.observe(time.perf_counter() - started)
            self.metrics.batch.observe(len(crops))
        # On a Redis error nothing is acked: the entries stay pending and are reclaimed later.
        self._publish(waiting, probs)

    def _reject_all(self, waiting: list[Waiting], detail: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        for w in waiting:
            self.dead_letter(pipe, w.entry, "inference_error", detail)
        pipe.execute()

    def _tracker(self, camera: str) -> CameraTracker:
        tracker = self._trackers.get(camera)
        if tracker is None:
            if not self._track_base:
                # Ids stay unique across restarts and replicas: a Redis counter picks the id block.
                self._track_base = int(self.r.incr(f"{self.keys.prefix}:track-block")) * 1_000_000
            tracker = CameraTracker(camera, self.classifier.classes, self.tracking, first_id=self._track_base + 1)
            self._trackers[camera] = tracker
        return tracker

    def _track(self, msg: FacesMsg, probs: np.ndarray) -> tuple[list[int | None], list[TrackEventMsg]]:
        if not self.tracking.enabled:
            return [None] * len(msg.faces), []
        dets = [Detection(f.box, probs[i]) for i, f in enumerate(msg.faces)]
        ids, track_events = self._tracker(msg.camera).update(msg.capture_ts, dets)
        return list(ids), track_events

    def _expire_tracks(self) -> None:
        self._last_expiry = time.monotonic()
        ended = [e for t in self._trackers.values() for e in t.expire_idle()]
        if ended:
            pipe = self.r.pipeline(transaction=False)
            self._queue_tracks(pipe, ended)
            pipe.execute()
            self.live.flush()

    def _queue_tracks(self, pipe: Any, track_events: list[TrackEventMsg]) -> None:
        for te in track_events:
            payload = encode_track(te)
            pipe.xadd(self.keys.tracks, {FIELD: payload}, maxlen=self.cfg.events_maxlen, approximate=True)
            if self.cfg.publish_live:
                self.live.queue(pipe, self.keys.tracks_channel, payload)
            self.metrics.track_events.labels(camera=te.camera, kind=te.kind).inc()

    def _publish(self, waiting: list[Waiting], probs: np.ndarray) -> None:
        pipe = self.r.pipeline(transaction=False)
        now = time.time()
        row = 0
        events = []
        track_events: list[TrackEventMsg] = []
        for w in waiting:
            n = len(w.msg.faces)
            ids, tevs = self._track(w.msg, probs[row:row + n])
            track_events += tevs
            for index, face in enumerate(w.msg.faces):
                events.append(self._event(w.msg, index, face.box, probs[row], now, ids[index]))
                row += 1
            pipe.xack(w.entry.stream, self.group, w.entry.id)
        self._queue_tracks(pipe, track_events)
        for ev in events:
            payload = encode_event(ev)
            pipe.xadd(self.keys.events, {FIELD: payload}, maxlen=self.cfg.events_maxlen, approximate=True)
            if self.cfg.publish_live:
                self.live.queue(pipe, self.keys.events_channel, payload)
        pipe.execute()
        self.live.flush()
        for ev in events:
            self.metrics.events.labels(camera=ev.camera, emotion=ev.label).inc()
            self.metrics.end_to_end.labels(camera=ev.camera).observe(max(0.0, ev.publish_ts - ev.capture_ts))

    def _event(self, msg: FacesMsg, index: int, box: Box, p: np.ndarray, now: float,
               track_id: int | None) -> EventMsg:
        best = int(np.argmax(p))
        classes = self.classifier.classes
        return EventMsg(event_id=event_id(msg.camera, msg.seq, index), camera=msg.camera, seq=msg.seq, face=index,
                        capture_ts=msg.capture_ts, publish_ts=now, box=box,
                        label=classes[best], score=float(p[best]), classes=classes,
                        probs=tuple(float(x) for x in p), model_version=self.classifier.meta.version,
                        track_id=track_id)

    def ready(self) -> tuple[bool, str]:
        try:
            self.r.ping()
        except CONNECTION_ERRORS as exc:
            return False, f"redis: {exc}"
        return True, f"redis ok, model {self.classifier.meta.version} ({self.classifier.runtime})"

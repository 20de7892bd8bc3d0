"""Classify: batches face crops, runs the model, publishes one event per face."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.classify.publisher import Classified, Model, Publisher
from services.classify.settings import ClassifySettings
from shared.classifier import Classifier
from shared.health import LATENCY_BUCKETS, CommonMetrics
from shared.imaging import resize_faces
from shared.schema import DecodeError, FacesMsg, TrackEventMsg, decode_faces
from shared.streams import CONNECTION_ERRORS, Entry, is_cluster
from shared.tracking import CameraTracker, Detection
from shared.worker import Stopper, StreamWorker

log = logging.getLogger(__name__)

# A batch whose inference raised is run once more before its messages are tried one by one.
INFERENCE_TRIES = 2
MAX_CROP = 1024


class ClassifyMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "classify")
        self.batch = Histogram("es_classify_batch_size", "Faces per model call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.inference = Histogram("es_classify_inference_seconds", "Model time per batch",
                                   buckets=LATENCY_BUCKETS, registry=registry)
        self.events = Counter("es_events_total", "Emotion events published, by the first zone their face is in "
                              "(or none)", ["camera", "emotion", "zone"], registry=registry)
        self.track_events = Counter("es_track_events_total", "Track events published", ["camera", "kind"],
                                    registry=registry)
        self.end_to_end = Histogram("es_end_to_end_seconds", "Capture to event publish", ["camera"],
                                    buckets=LATENCY_BUCKETS, registry=registry)


@dataclass
class Waiting:
    entry: Entry
    msg: FacesMsg
    since: float


def invalid_faces(msg: FacesMsg) -> str | None:
    """Why a decodable faces message cannot be classified (None when it can)."""
    if not msg.faces:
        return "no faces"
    if not 1 <= msg.size <= MAX_CROP:
        return f"crop size {msg.size} outside 1..{MAX_CROP}"
    return None


def crops_of(msg: FacesMsg, size: int) -> np.ndarray:
    """The message's crops as (faces, size, size) uint8, resized when detect cropped another size."""
    side = msg.size
    crops = np.stack([np.frombuffer(f.crop, dtype=np.uint8).reshape(side, side) for f in msg.faces])
    return crops if side == size else resize_faces(crops, size)


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
        self.publisher = Publisher(r, self.keys, self.cfg, self.group, metrics,
                                   Model(tuple(classifier.classes), classifier.meta.version), self,
                                   transactional=not is_cluster(r), writing=self.clock.writing)
        self.live = self.publisher.live

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
        self._accept(entries)
        if self._faces_waiting >= self.cfg.max_batch or self._due() or (self.cfg.eager and queue_empty):
            self.flush()
        self._maybe_expire_tracks()

    def handle_claimed(self, entries: list[Entry]) -> None:
        """Entries taken over from a dead consumer run at once, without waiting for company."""
        self._accept(entries)
        self.flush()

    def _accept(self, entries: list[Entry]) -> None:
        """Decode and validate each entry on its own; bad ones are dead-lettered, the rest wait."""
        bad: list[tuple[Entry, str, str]] = []
        for entry in entries:
            try:
                msg = decode_faces(entry.payload or b"")
            except DecodeError as exc:
                bad.append((entry, exc.reason, exc.detail))
                continue
            problem = invalid_faces(msg)
            if problem:
                bad.append((entry, "bad_faces", problem))
                continue
            self._waiting.append(Waiting(entry, msg, time.monotonic()))
            self._faces_waiting += len(msg.faces)
        if bad:
            pipe = self.slot_pipeline()
            for bad_entry, reason, detail in bad:
                self.dead_letter(pipe, bad_entry, reason, detail)
            with self.clock.writing():
                pipe.execute()

    def idle(self) -> None:
        if self._due():
            self.flush()
        self._maybe_expire_tracks()

    def drain(self) -> None:
        if self._waiting:
            log.info("draining %d waiting face messages", len(self._waiting))
            self.flush()
        # Tracks live in this process: end them, so consumers see every track close.
        ended = [e for t in self._trackers.values() for e in t.flush()]
        if ended:
            self._publish_tracks(ended)

    def _due(self) -> bool:
        return bool(self._waiting) and (time.monotonic() - self._waiting[0].since) * 1000 >= self.cfg.max_wait_ms

    def flush(self) -> None:
        """Run the model on what waits and publish; on a Redis error nothing is acked (reclaimed later)."""
        waiting, self._waiting, self._faces_waiting = self._waiting, [], 0
        if not waiting:
            return
        done, failed = self._infer(waiting)
        if failed:
            self._reject(failed)
        if done:
            self.publisher.publish(done)

    def _infer(self, waiting: list[Waiting]) -> tuple[list[Classified], list[tuple[Waiting, str]]]:
        """Probabilities per message. A failing batch is tried again once (the error may pass),
        then message by message, so only the messages that fail themselves are dead-lettered."""
        for _ in range(INFERENCE_TRIES):
            try:
                return self._predict(waiting), []
            except Exception:  # any runtime error: isolate it below rather than lose the batch
                log.exception("inference failed on a batch of %d messages", len(waiting))
        if len(waiting) == 1:
            return [], [(waiting[0], "inference failed")]
        done: list[Classified] = []
        failed: list[tuple[Waiting, str]] = []
        for w in waiting:
            try:
                done += self._predict([w])
            except Exception as exc:  # this message is the culprit
                failed.append((w, f"{type(exc).__name__}: {exc}"))
        return done, failed

    def _predict(self, waiting: list[Waiting]) -> list[Classified]:
        size = self.classifier.meta.input_size
        crops = np.concatenate([crops_of(w.msg, size) for w in waiting])
        started = time.perf_counter()
        probs = self.classifier.predict(crops)
        self.metrics.inference.observe(time.perf_counter() - started)
        self.metrics.batch.observe(len(crops))
        out, row = [], 0
        for w in waiting:
            out.append(Classified(w.entry, w.msg, probs[row:row + len(w.msg.faces)]))
            row += len(w.msg.faces)
        return out

    def _reject(self, failed: list[tuple[Waiting, str]]) -> None:
        pipe = self.slot_pipeline()
        for w, detail in failed:
            self.dead_letter(pipe, w.entry, "inference_error", detail)
        with self.clock.writing():
            pipe.execute()

    def _maybe_expire_tracks(self) -> None:
        """End tracks whose faces are gone; checked on every pass, so steady load does not stop it."""
        if not self.tracking.enabled or time.monotonic() - self._last_expiry < 0.5:
            return
        self._last_expiry = time.monotonic()
        ended = [e for t in self._trackers.values() for e in t.expire_idle()]
        if ended:
            self._publish_tracks(ended)

    def _publish_tracks(self, ended: list[TrackEventMsg]) -> None:
        pipe = self.r.pipeline(transaction=False)
        self.publisher.queue_tracks(pipe, ended)
        with self.clock.writing():
            pipe.execute()
        self.live.flush()

    def _tracker(self, camera: str) -> CameraTracker:
        tracker = self._trackers.get(camera)
        if tracker is None:
            if not self._track_base:
                # Ids stay unique across restarts and replicas: a Redis counter picks the id block.
                self._track_base = int(self.r.incr(f"{self.keys.prefix}:track-block")) * 1_000_000
            tracker = CameraTracker(camera, self.classifier.classes, self.tracking, first_id=self._track_base + 1)
            self._trackers[camera] = tracker
        return tracker

    def track(self, msg: FacesMsg, probs: np.ndarray) -> tuple[list[int | None], list[TrackEventMsg]]:
        if not self.tracking.enabled:
            return [None] * len(msg.faces), []
        dets = [Detection(f.box, probs[i]) for i, f in enumerate(msg.faces)]
        return self._tracker(msg.camera).update(msg.capture_ts, dets)

    def snapshot_trackers(self) -> dict[str, CameraTracker]:
        """A copy to roll back to when a publish fails: the faces come again and must not count twice."""
        return copy.deepcopy(self._trackers)

    def restore_trackers(self, saved: dict[str, CameraTracker]) -> None:
        self._trackers = saved

    def ready(self) -> tuple[bool, str]:
        try:
            self.r.ping()
        except CONNECTION_ERRORS as exc:
            return False, f"redis: {exc}"
        return True, f"redis ok, model {self.classifier.meta.version} ({self.classifier.runtime})"

"""Detect: frames in, face crops out (one faces message per frame with faces)."""

from __future__ import annotations

import logging
import time
from typing import Any

import cv2
import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.detect.settings import DetectSettings
from shared.detection import Detector, FollowingDetector, detect_and_crop
from shared.health import LATENCY_BUCKETS, CommonMetrics
from shared.schema import FIELD, DecodeError, FaceCrop, FacesMsg, FrameMsg, decode_frame, encode_faces
from shared.streams import CONNECTION_ERRORS, Entry
from shared.worker import Stopper, StreamWorker

log = logging.getLogger(__name__)


class DetectMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "detect")
        self.processed = Counter("es_detect_frames_total", "Frames run through face detection", ["camera"],
                                 registry=registry)
        self.faces = Counter("es_detect_faces_total", "Faces found", ["camera"], registry=registry)
        self.frame_age = Histogram("es_detect_frame_age_seconds", "Frame age (capture to detect start)",
                                   buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("es_detect_seconds", "Decode + detect + crop time per frame",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.faces_per_frame = Histogram("es_detect_faces_per_frame", "Faces found per frame",
                                         buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32), registry=registry)


class DetectWorker(StreamWorker):
    service = "detect"

    def __init__(self, settings: DetectSettings, r: redis.Redis, detector: Detector, metrics: DetectMetrics,
                 stopper: Stopper | None = None) -> None:
        super().__init__(settings, r, settings.detect.group, metrics, stopper)
        self.cfg = settings
        # Following known faces between keyframes needs frames of a camera in order; each worker
        # follows the frames it gets (consumer groups hand a camera's frames out in order).
        self.detector: Detector = detector
        self.follower = FollowingDetector(detector, settings.detector) if settings.detector.keyframe_interval else None
        self.metrics = metrics
        self._streams: list[str] = []
        self._streams_at = 0.0

    def streams(self) -> list[str]:
        now = time.monotonic()
        if now - self._streams_at >= self.cfg.detect.cameras_refresh_s or not self._streams:
            cameras = sorted(c.decode() if isinstance(c, bytes) else str(c)
                             for c in self.r.smembers(self.keys.cameras))
            self._streams = [self.keys.frames(c) for c in cameras]
            self._streams_at = now
        return self._streams

    def read_count(self) -> int:
        return self.cfg.detect.read_count

    def handle(self, entries: list[Entry]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for entry in entries:
            try:
                self._process(pipe, entry)
            except Exception as exc:  # one bad frame must not stop the worker: dead-letter it
                log.exception("processing %s %s failed", entry.stream, entry.id)
                camera = self.keys.camera_from_frames(entry.stream)
                self._reject(pipe, entry, camera, "processing_error", f"{type(exc).__name__}: {exc}")
            pipe.xack(entry.stream, self.group, entry.id)
        pipe.execute()

    def _process(self, pipe: Any, entry: Entry) -> None:
        camera = self.keys.camera_from_frames(entry.stream)
        try:
            msg = decode_frame(entry.payload or b"")
        except DecodeError as exc:
            self._reject(pipe, entry, camera, exc.reason, exc.detail)
            return
        if msg.camera != camera:
            self._reject(pipe, entry, camera, "camera_mismatch", f"message for {msg.camera!r} on {camera!r}'s stream")
            return
        age = time.time() - msg.capture_ts
        self.metrics.frame_age.observe(max(0.0, age))
        if age > self.cfg.detect.max_frame_age_s:
            self.metrics.drop(camera, "stale")
            return
        if msg.width * msg.height > self.cfg.detect.max_pixels:
            self._reject(pipe, entry, camera, "too_large", f"{msg.width}x{msg.height}")
            return
        started = time.perf_counter()
        image = cv2.imdecode(np.frombuffer(msg.jpeg, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None or image.size == 0:
            self._reject(pipe, entry, camera, "decode_error", f"{len(msg.jpeg)} bytes are not a decodable JPEG")
            return
        if image.shape[0] * image.shape[1] > self.cfg.detect.max_pixels:
            self._reject(pipe, entry, camera, "too_large", f"decoded {image.shape[1]}x{image.shape[0]}")
            return
        self._detect(pipe, msg, image, started)

    def _detect(self, pipe: Any, msg: FrameMsg, image: np.ndarray, started: float) -> None:
        detector = self.detector if self.follower is None else self.follower.bound(msg.camera)
        found = detect_and_crop(detector, image, self.cfg.detector.margin)
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.processed.labels(camera=msg.camera).inc()
        self.metrics.faces_per_frame.observe(len(found))
        if not found:
            return
        self.metrics.faces.labels(camera=msg.camera).inc(len(found))
        faces = FacesMsg(camera=msg.camera, seq=msg.seq, capture_ts=msg.capture_ts, detect_ts=time.time(),
                         size=found[0].crop.shape[0],
                         faces=tuple(FaceCrop(box=f.box, crop=f.crop.tobytes()) for f in found))
        pipe.xadd(self.keys.faces, {FIELD: encode_faces(faces)}, maxlen=self.cfg.detect.faces_maxlen,
                  approximate=True)

    def _reject(self, pipe: Any, entry: Entry, camera: str, reason: str, detail: str) -> None:
        self.metrics.drop(camera, reason)
        self.dead_letter(pipe, entry, reason, detail)

    def ready(self) -> tuple[bool, str]:
        try:
            self.r.ping()
        except CONNECTION_ERRORS as exc:
            return False, f"redis: {exc}"
        return True, f"redis ok, {len(self._streams)} camera streams"

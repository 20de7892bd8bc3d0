"""Detect: frames in, face crops out (one faces message per frame with faces).

Each camera's frames are handled by one worker at a time, in capture order: a worker reads
only the streams of the cameras whose lease it holds (at most its fair share of them), so the
per-camera state of the motion-gated detector (background, known faces) sees every frame, and
classify gets each camera's faces in capture order. A dead worker's cameras are taken over when
their leases lapse; the new owner first claims the frames the dead one left pending.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import cv2
import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.detect.settings import DetectSettings
from shared.cameras import CameraRegistry, CameraSettings
from shared.detection import CameraDetector, crop_faces
from shared.health import LATENCY_BUCKETS, CommonMetrics
from shared.leases import LeaseKeeper, LeasePool, fair_share
from shared.schema import FIELD, Box, DecodeError, FaceCrop, FacesMsg, FrameMsg, decode_frame, encode_faces
from shared.streams import CONNECTION_ERRORS, Entry, Keys, is_transient, refusal_reason, watch_broken
from shared.worker import Stopper, StreamWorker
from shared.zones import CameraGeometries, CameraGeometry, blank, zone_label

log = logging.getLogger(__name__)

FRACTION_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class DetectMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "detect")
        self.processed = Counter("es_detect_frames_total", "Frames run through face detection", ["camera"],
                                 registry=registry)
        self.faces = Counter("es_detect_faces_total", "Faces found, by the first zone their centre is in (or none)",
                             ["camera", "zone"], registry=registry)
        self.masked_frames = Counter("es_detect_masked_frames_total",
                                     "Frames searched with the camera's mask blanked out", ["camera"],
                                     registry=registry)
        self.faces_dropped = Counter("es_detect_faces_dropped_total", "Faces found but not published, by reason "
                                     "(mask: the centre lies in the camera's mask)", ["camera", "reason"],
                                     registry=registry)
        self.frame_age = Histogram("es_detect_frame_age_seconds", "Frame age (capture to detect start)",
                                   buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("es_detect_seconds", "Decode + detect + crop time per frame",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.faces_per_frame = Histogram("es_detect_faces_per_frame", "Faces found per frame",
                                         buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32), registry=registry)
        self.motionless = Counter("es_detect_motionless_frames_total",
                                  "Frames where nothing moved and no face was known: no detector run", ["camera"],
                                  registry=registry)
        self.searched = Histogram("es_detect_searched_fraction", "Fraction of a frame's pixels searched for faces",
                                  buckets=FRACTION_BUCKETS, registry=registry)
        self.full_searches = Counter("es_detect_full_searches_total", "Whole-frame searches, by reason",
                                     ["camera", "reason"], registry=registry)
        self.relieved = Counter("es_detect_relieved_frames_total",
                                "Frames whose whole-frame safety net was due but put off because detect is behind "
                                "(the frame was detector.motion.behind_s old or older)", ["camera"],
                                registry=registry)
        self.owned = Gauge("es_detect_cameras_owned", "Cameras whose frames this worker handles", registry=registry)
        self.lease_conflicts = Counter("es_detect_lease_conflicts_total",
                                       "Batches discarded because a camera's lease changed hands while they ran",
                                       registry=registry)
        self.refused_writes = Counter("es_detect_refused_writes_total",
                                      "Batch writes refused, by reason: lease_lost (fenced off: another worker "
                                      "owns the camera now) or a Redis refusal (nothing acked, retried)",
                                      ["reason"], registry=registry)
        self.takeovers = Counter("es_detect_camera_takeovers_total",
                                 "Cameras this worker started handling (first start, rebalancing, takeover)",
                                 registry=registry)


class DetectWorker(StreamWorker):
    service = "detect"

    def __init__(self, settings: DetectSettings, r: redis.Redis, detector: CameraDetector, metrics: DetectMetrics,
                 stopper: Stopper | None = None) -> None:
        super().__init__(settings, r, settings.detect.group, metrics, stopper)
        self.cfg = settings
        self.detector = detector
        self.metrics = metrics
        prefix = settings.redis.prefix
        self.leases = LeasePool(r, f"{prefix}:detect-lease", f"{prefix}:detect-workers")
        self.keeper = LeaseKeeper(self.leases, self.consumer, settings.detect.lease_s)
        self.owned: set[str] = set()
        self.epochs: dict[str, int] = {}  # camera -> lease epoch when taken: the fencing token of our writes
        self._renewed_at = 0.0
        self._cameras: list[str] = []
        self._cameras_at = 0.0
        self._keeping = False
        self.registry = CameraRegistry(r, prefix)
        self.geometries = CameraGeometries(self._camera_settings, settings.detect.cameras_refresh_s)

    def _camera_settings(self) -> dict[str, CameraSettings]:
        """Masks and zones: the registry's cameras when it has any (dynamic ingest), else the file's."""
        live, _ = self.registry.cameras()
        return live or {c.id: c for c in self.cfg.cameras}

    # -- which cameras ------------------------------------------------------

    def streams(self) -> list[str]:
        for camera in sorted(self.keeper.take_lost() & self.owned):
            self._drop(camera, "lease taken by another worker")
        now = time.monotonic()
        if now - self._renewed_at >= self.cfg.detect.lease_s / 3 or not self.owned:
            self._renewed_at = now
            self._rebalance(now)
            self._adopt_pending()
        self.geometries.refresh()
        return [self.keys.frames(c) for c in sorted(self.owned)]

    def _rebalance(self, now: float) -> None:
        lease_s = self.cfg.detect.lease_s
        cameras = self._all_cameras(now)
        members = self.leases.beat(self.consumer, lease_s)
        quota = fair_share(len(cameras), members)
        for camera in sorted(self.owned):
            epoch = self.leases.take(camera, self.consumer, lease_s) if camera in cameras else 0
            if not epoch:
                self._drop(camera, "lease lost" if camera in cameras else "camera gone")
            elif epoch != self.epochs[camera]:
                self._take(camera, epoch)  # it lapsed and was taken again: start over from its pending frames
        for camera in sorted(self.owned, reverse=True)[: max(0, len(self.owned) - quota)]:
            self._drop(camera, f"rebalancing: {members} workers share {len(cameras)} cameras")
            self.leases.release(camera, self.consumer)
        for camera in cameras:
            if len(self.owned) >= quota:
                break
            if camera not in self.owned:
                epoch = self.leases.take(camera, self.consumer, lease_s)
                if epoch:
                    self._take(camera, epoch)
        self._keep_leases()

    def _keep_leases(self) -> None:
        """Leases are renewed from a thread too, so a batch longer than a lease does not lose them."""
        self.keeper.track(self.owned)
        self.metrics.owned.set(len(self.owned))
        if not self._keeping:
            self._keeping = True
            self.keeper.start()

    def _all_cameras(self, now: float) -> list[str]:
        if now - self._cameras_at >= self.cfg.detect.cameras_refresh_s or not self._cameras:
            self._cameras = sorted(c.decode() if isinstance(c, bytes) else str(c)
                                   for c in self.r.smembers(self.keys.cameras))
            self._cameras_at = now
        return self._cameras

    def _take(self, camera: str, epoch: int) -> None:
        self.owned.add(camera)
        self.epochs[camera] = epoch
        self.detector.forget(camera)
        self.metrics.takeovers.inc()
        log.info("camera %s: frames handled by %s (lease epoch %d)", camera, self.consumer, epoch)
        stream = self.keys.frames(camera)
        self._ensure_groups([stream])
        # Frames the previous owner read but never acked come first, in order: no idle wait,
        # the lease says that owner is gone.
        self._claim_stream(stream, idle_ms=0)

    def _adopt_pending(self) -> None:
        """Frames of an owned camera pending on another consumer are taken now, not after ``claim_idle_ms``.

        They were read by an owner that lost the lease while they waited (it stalled, or read them
        after this worker's takeover claim); the fences refuse its writes, so they are this worker's.
        """
        for camera in sorted(self.owned):
            stream = self.keys.frames(camera)
            summary = self.r.xpending(stream, self.group)
            others = [c for c in summary.get("consumers") or [] if _name(c["name"]) != self.consumer]
            if others:
                log.info("camera %s: taking %d frames left pending by a former owner", camera,
                         sum(int(c["pending"]) for c in others))
                self._claim_stream(stream, idle_ms=0)

    def _drop(self, camera: str, why: str) -> None:
        self.owned.discard(camera)
        self.epochs.pop(camera, None)
        self.detector.forget(camera)
        self.keeper.track(self.owned)
        self.metrics.owned.set(len(self.owned))
        log.info("camera %s: no longer handled by %s (%s)", camera, self.consumer, why)

    def drain(self) -> None:
        self.keeper.stop()
        try:
            for camera in sorted(self.owned):
                self.leases.release(camera, self.consumer)
            self.leases.leave(self.consumer)
        except CONNECTION_ERRORS:
            pass  # the leases lapse on their own

    # -- frames -------------------------------------------------------------

    def read_count(self) -> int:
        return self.cfg.detect.read_count

    def handle(self, entries: list[Entry]) -> None:
        """Outputs before acks, and only while this worker still holds each camera's lease epoch.

        Single Redis: outputs and acks in one MULTI/EXEC, the cameras' epoch keys WATCHed, so a
        takeover during the batch discards it whole. Cluster (no transaction across slots): per
        camera, the outputs are written after a fence check and the acks go in a script on the
        lease's slot that acks only if the epoch is unchanged. A refused output means no ack.
        """
        batch = {self.keys.camera_from_frames(e.stream) for e in entries}
        for camera in sorted(self.keeper.take_lost() & self.owned):
            if camera in batch:
                self._refused(camera, "lease taken by another worker")
            else:
                self._drop(camera, "lease taken by another worker")
        entries = [e for e in entries if self.keys.camera_from_frames(e.stream) in self.owned]
        if not entries:
            return
        if self._clustered:
            for camera, mine in _by_camera(self.keys, entries).items():
                self._commit_camera(camera, mine)
        else:
            self._commit_transaction(entries)

    def _commit_transaction(self, entries: list[Entry]) -> None:
        pipe = self.pipeline()
        cameras = sorted({self.keys.camera_from_frames(e.stream) for e in entries})
        try:
            held = self._watch_fences(pipe, cameras)
            self._queue_batch(pipe, [e for e in entries if self.keys.camera_from_frames(e.stream) in held])
            self._queue_acks(pipe, [e for e in entries if self.keys.camera_from_frames(e.stream) in held])
            self._execute(pipe)
        except redis.WatchError as exc:
            if watch_broken(exc):  # the connection dropped: an outage, not another owner
                raise redis.ConnectionError(str(exc)) from exc
            self._on_conflict(cameras)
        finally:
            pipe.reset()

    def _watch_fences(self, pipe: Any, cameras: list[str]) -> set[str]:
        """The cameras still held in the epoch they were taken in; their epoch keys are watched until EXEC."""
        pipe.watch(*[self.leases.epoch_key(c) for c in cameras])
        held = set()
        for camera in cameras:
            owner, epoch = pipe.get(self.leases.lease_key(camera)), pipe.get(self.leases.epoch_key(camera))
            if _name(owner) == self.consumer and _name(epoch) == str(self.epochs.get(camera)):
                held.add(camera)
            else:
                self._refused(camera, "lease taken by another worker")
        pipe.multi()
        return held

    def _commit_camera(self, camera: str, entries: list[Entry]) -> None:
        """Cluster: this camera's outputs (faces, dead letters) first, then its fenced acks."""
        outputs = self.r.pipeline(transaction=False)
        self._queue_batch(outputs, entries)
        epoch = self.epochs[camera]
        # Checked again just before writing: a worker that stalled past its lease writes nothing.
        if not self.leases.fenced(camera, self.consumer, epoch):
            outputs.reset()
            self._refused(camera, "lease taken by another worker")
            return
        self._execute(outputs)
        stream = self.keys.frames(camera)
        with self.clock.writing():
            held = self.leases.ack_if_held(camera, self.consumer, epoch, stream, self.group, [e.id for e in entries])
        if not held:
            # Written but not acked: the new owner processes these frames again (same ids downstream).
            self._refused(camera, "lease taken by another worker before the acks")

    def _queue_batch(self, pipe: Any, entries: list[Entry]) -> None:
        for entry in entries:
            try:
                self._process(pipe, entry)
            except Exception as exc:  # one bad frame must not stop the worker: dead-letter it
                log.exception("processing %s %s failed", entry.stream, entry.id)
                camera = self.keys.camera_from_frames(entry.stream)
                self._reject(pipe, entry, camera, "processing_error", f"{type(exc).__name__}: {exc}")

    def _queue_acks(self, pipe: Any, entries: list[Entry]) -> None:
        for entry in entries:
            pipe.xack(entry.stream, self.group, entry.id)

    def _execute(self, pipe: Any) -> None:
        """Run the outputs; a refusal (OOM, READONLY, CLUSTERDOWN) is counted and raised: nothing is acked."""
        try:
            with self.clock.writing():
                pipe.execute()
        except redis.WatchError:
            raise
        except redis.RedisError as exc:
            if is_transient(exc):
                self.metrics.refused_writes.labels(reason=refusal_reason(exc)).inc()
            raise

    def _refused(self, camera: str, why: str) -> None:
        """A write fenced off: this worker lost the camera. Stop reading it now; its owner takes what is pending."""
        self.metrics.lease_conflicts.inc()
        self.metrics.refused_writes.labels(reason="lease_lost").inc()
        log.warning("camera %s: %s; this batch's output was discarded", camera, why)
        if camera in self.owned:
            self._drop(camera, why)

    def _on_conflict(self, cameras: list[str]) -> None:
        """A watched epoch changed during the batch: drop the cameras lost, redo the others' frames now."""
        for camera in cameras:
            if camera not in self.owned:
                continue
            if self.leases.fenced(camera, self.consumer, self.epochs[camera]):
                self._claim_stream(self.keys.frames(camera), idle_ms=0)
            else:
                self._refused(camera, "lease changed hands during a batch")

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
        self._detect(pipe, msg, image, started, age)

    def _detect(self, pipe: Any, msg: FrameMsg, image: np.ndarray, started: float, age: float) -> None:
        geometry = self.geometries.get(msg.camera)
        boxes = self.detector.detect(blank(image, geometry), msg.camera, msg.capture_ts, lag_s=age)
        if geometry is not None and geometry.mask:
            boxes = self._unmasked(geometry, msg.camera, boxes, image)
        # Crops come from the frame as it is: a face beside the mask keeps its own pixels.
        found = crop_faces(image, boxes, self.cfg.detector.margin)
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.processed.labels(camera=msg.camera).inc()
        self.metrics.faces_per_frame.observe(len(found))
        self._count_search(msg.camera)
        if not found:
            return
        h, w = image.shape[:2]
        crops = []
        for f in found:
            zones = geometry.zones_of(f.box, w, h) if geometry is not None else ()
            self.metrics.faces.labels(camera=msg.camera, zone=zone_label(zones)).inc()
            crops.append(FaceCrop(box=f.box, crop=f.crop.tobytes(), zones=zones))
        faces = FacesMsg(camera=msg.camera, seq=msg.seq, capture_ts=msg.capture_ts, detect_ts=time.time(),
                         size=found[0].crop.shape[0], faces=tuple(crops))
        pipe.xadd(self.keys.faces, {FIELD: encode_faces(faces)}, maxlen=self.cfg.detect.faces_maxlen,
                  approximate=True)

    def _unmasked(self, geometry: CameraGeometry, camera: str, boxes: list[Box], image: np.ndarray) -> list[Box]:
        """Faces whose centre is outside the mask; the others are dropped and counted.

        The detector never saw the masked pixels, but a face straddling the mask's edge, or one a
        motion-gated detector kept from before the mask was set, can still be reported there.
        """
        self.metrics.masked_frames.labels(camera=camera).inc()
        h, w = image.shape[:2]
        kept = [b for b in boxes if not geometry.masked(b, w, h)]
        if len(kept) < len(boxes):
            self.metrics.faces_dropped.labels(camera=camera, reason="mask").inc(len(boxes) - len(kept))
        return kept

    def _count_search(self, camera: str) -> None:
        report = self.detector.last
        if report is None:
            return
        self.metrics.searched.observe(report.searched)
        if report.skipped:
            self.metrics.motionless.labels(camera=camera).inc()
        if report.full_reason is not None:
            self.metrics.full_searches.labels(camera=camera, reason=report.full_reason).inc()
        relieved = self.metrics.relieved.labels(camera=camera)  # 0 is a reading too: the panel shows "never behind"
        if report.relieved:
            relieved.inc()

    def _reject(self, pipe: Any, entry: Entry, camera: str, reason: str, detail: str) -> None:
        self.metrics.drop(camera, reason)
        self.dead_letter(pipe, entry, reason, detail, ack=False)  # acked with the batch, after its outputs

    def ready(self) -> tuple[bool, str]:
        try:
            self.r.ping()
        except CONNECTION_ERRORS as exc:
            return False, f"redis: {exc}"
        return True, f"redis ok, {len(self.owned)} cameras owned"


def _by_camera(keys: Keys, entries: list[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for entry in entries:
        out.setdefault(keys.camera_from_frames(entry.stream), []).append(entry)
    return out


def _name(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

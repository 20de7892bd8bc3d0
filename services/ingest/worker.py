"""Ingest: one reader thread per camera publishing JPEG frames to its Redis stream."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import cast

import cv2
import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.ingest.settings import IngestSettings
from services.ingest.source import EndOfStream, Frame, SourceError, SourceState, VideoSource
from shared.camera_ownership import CameraOwnership
from shared.cameras import CameraRegistry, CameraSettings
from shared.health import LATENCY_BUCKETS, CommonMetrics, Heartbeat
from shared.imaging import UInt8Array, to_gray
from shared.masking import mask_text
from shared.schema import FIELD, FrameMsg, encode_frame
from shared.sequence import SeqAllocator
from shared.streams import (
    TRANSIENT_ERRORS,
    Backoff,
    Keys,
    default_consumer_name,
    group_stats,
    refusal_reason,
)
from shared.worker import ChildStopper, PhaseClock, Stopper

log = logging.getLogger(__name__)

class IngestMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "ingest")
        self.read = Counter("es_frames_read_total", "Frames read from the source", ["camera"], registry=registry)
        self.published = Counter("es_frames_published_total", "Frames published to Redis", ["camera"],
                                 registry=registry)
        self.up = Gauge("es_camera_up", "1 while the camera delivers frames", ["camera"], registry=registry)
        self.reconnects = Counter("es_camera_reconnects_total", "Camera (re)connection attempts after a failure",
                                  ["camera"], registry=registry)
        self.stalls = Counter("es_camera_stalls_total", "Times the frame-age watchdog found a camera hung",
                              ["camera"], registry=registry)
        self.frame_age = Gauge("es_camera_last_frame_age_seconds", "Seconds since the camera's last frame",
                               ["camera"], registry=registry)
        self.encode = Histogram("es_ingest_encode_seconds", "JPEG encoding time", buckets=LATENCY_BUCKETS,
                                registry=registry)
        self.reader_errors = Counter("es_camera_reader_errors_total", "Unexpected errors in a camera's reader "
                                     "(each is counted as a dropped frame, paused on and retried)",
                                     ["camera", "reason"], registry=registry)


class CameraReader(threading.Thread):
    """Reads one camera until stopped: open, read, encode, publish; reconnects with backoff."""

    def __init__(self, cam: CameraSettings, settings: IngestSettings, r: redis.Redis, metrics: IngestMetrics,
                 stopper: Stopper) -> None:
        super().__init__(name=f"camera-{cam.id}", daemon=True)
        self.cam = cam
        self.opts = settings.ingest
        self.r = r
        self.metrics = metrics
        self.stopper = stopper
        self.stream = Keys(settings.redis.prefix).frames(cam.id)
        self.seq = SeqAllocator(r, f"{settings.redis.prefix}:seq:{{{cam.id}}}")
        self.source = VideoSource(cam, self.opts.open_timeout_s)
        self.state = SourceState.CONNECTING
        self.last_frame = time.monotonic()
        self.stalled = threading.Event()
        self.last_error = ""
        self._backoff = Backoff(self.opts.reconnect_initial_s, self.opts.reconnect_max_s)
        self._redis_backoff = Backoff(settings.redis.backoff_initial_s, settings.redis.backoff_max_s)
        self._next_publish = 0.0
        self._published = 0
        self._rate_mark = (time.monotonic(), 0)
        self._lag = 0
        self._lag_checked = 0.0
        self._opened = False
        self._redis_retry_at = 0.0
        self._redis_refusal = "redis_unavailable"
        self.clock = PhaseClock(metrics.phase, "ingest")
        self.metrics.up.labels(camera=cam.id).set(0)

    def run(self) -> None:
        """Reads until stopped or the file ends; any error is counted, paused on and retried.

        Nothing may end this thread early: a dead reader would leave its camera silently stopped
        (the watchdog only watches cameras that are up).
        """
        try:
            while not self.stopper.stopping and self.state is not SourceState.ENDED:
                try:
                    if self._opened or self._connect():
                        self._read_loop()
                        self._opened = False  # the loop returns when the source failed or ended
                except Exception as exc:  # supervised: see the docstring
                    self._crashed(exc)
        finally:
            self.source.close()
            self.metrics.up.labels(camera=self.cam.id).set(0)
            if self.state is not SourceState.ENDED:
                self.state = SourceState.STOPPED

    def _connect(self) -> bool:
        self._set_state(SourceState.CONNECTING)
        try:
            self.source.open()
        except SourceError as exc:
            self._fail(str(exc))
            return False
        log.info("camera %s: opened %s (%.1f fps)", self.cam.id, self.source.safe_url, self.source.source_fps)
        self._opened = True
        self._backoff.reset()
        self.last_frame = time.monotonic()
        self.stalled.clear()
        return True

    def _crashed(self, exc: Exception) -> None:
        """An unexpected error in the read loop: count it, pause, and go on with the same source.

        Redis refusals (out of memory, READONLY after a failover) carry their own reason; the
        source stays open, so a file resumes where it was instead of starting over.
        """
        reason = refusal_reason(exc) if isinstance(exc, TRANSIENT_ERRORS) else "reader_error"
        self.metrics.drop(self.cam.id, reason)
        self.metrics.reader_errors.labels(camera=self.cam.id, reason=reason).inc()
        self.last_error = mask_text(f"{type(exc).__name__}: {exc}")
        delay = self._redis_backoff.next_delay()
        log.exception("camera %s: %s; frame dropped, going on in %.2fs", self.cam.id, reason, delay)
        self.stopper.wait(delay)
        self.last_frame = time.monotonic()  # our pause, not a hung source: keep the watchdog off

    def _fail(self, reason: str) -> None:
        self._opened = False
        self.last_error = reason
        self._set_state(SourceState.DOWN)
        self.metrics.reconnects.labels(camera=self.cam.id).inc()
        delay = self._backoff.next_delay()
        log.warning("camera %s: %s; reconnecting in %.1fs", self.cam.id, reason, delay)
        self.stopper.wait(delay)

    def _read_loop(self) -> None:
        while not self.stopper.stopping:
            self.clock.start()
            if self._pass():
                return
            self.clock.finish()

    def _pass(self) -> bool:
        """One frame: grab, decode and encode, publish; True ends the loop.

        A live camera's grab waits for the camera; a file's grab decodes the next frame (work),
        and the file waits for the frame's slot instead.
        """
        with self.clock.waiting() if not self.source.is_file else contextlib.nullcontext():
            try:
                captured = self.source.grab()
            except EndOfStream:
                log.info("camera %s: end of file", self.cam.id)
                self._set_state(SourceState.ENDED)
                return True
            except SourceError as exc:
                self._fail(str(exc))
                return True
        if self.stalled.is_set():
            self._fail("frame-age watchdog: source hung")
            return True
        self.last_frame = time.monotonic()
        self._set_state(SourceState.UP)
        self.metrics.read.labels(camera=self.cam.id).inc()
        with self.clock.waiting():  # a file's pacing: the wait for the frame's slot
            due = self._due()
        if not due:
            return False  # thinned: grabbed but never decoded
        if self.stopper.stopping:
            self.metrics.drop(self.cam.id, "shutdown")  # read, but the camera is being stopped
            return True
        try:
            frame = self.source.retrieve()
        except SourceError as exc:
            self.metrics.drop(self.cam.id, "decode_error")
            log.warning("camera %s: %s", self.cam.id, exc)
            return False
        # A file frame is "captured" when its pacing slot comes, as a camera would show it.
        frame.capture_ts = time.time() if self.source.is_file else captured
        self._publish(frame)
        return False

    def _set_state(self, state: SourceState) -> None:
        if state is not self.state:
            log.info("camera %s: %s -> %s", self.cam.id, self.state.value, state.value)
            self.state = state
        self.metrics.up.labels(camera=self.cam.id).set(1 if state is SourceState.UP else 0)

    def _due(self) -> bool:
        """Rate limit: files are paced to the target fps; faster live sources are thinned."""
        fps = self.cam.fps or (self.source.source_fps if self.source.is_file else 0.0)
        if fps <= 0:
            return True
        now = time.monotonic()
        interval = 1.0 / fps
        if self.source.is_file:
            if self._next_publish > now:
                self.stopper.wait(self._next_publish - now)
            self._next_publish = max(self._next_publish + interval, time.monotonic() - interval)
            return True
        if now + 0.002 < self._next_publish:
            self.metrics.drop(self.cam.id, "fps_limit")
            return False
        self._next_publish = max(self._next_publish + interval, now - interval)
        return True

    def _encode(self, frame: Frame) -> bytes | None:
        image = frame.image
        if image.shape[1] > self.opts.max_width:
            scale = self.opts.max_width / image.shape[1]
            image = cast(UInt8Array, cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
        if self.opts.grayscale:
            image = to_gray(image)
        quality = self.cam.jpeg_quality or self.opts.jpeg_quality
        try:
            with self.metrics.encode.time():
                ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        except cv2.error as exc:
            log.warning("camera %s: JPEG encoding failed: %s", self.cam.id, exc)
            ok = False
        if not ok:
            self.metrics.drop(self.cam.id, "encode_error")
            return None
        if buf.size > self.opts.max_frame_bytes:
            self.metrics.drop(self.cam.id, "too_large")
            return None
        return np.asarray(buf).tobytes()

    def _backlogged(self) -> bool:
        """True while ``backpressure_lag`` frames of this camera wait for detect (checked twice a second).

        Waiting means not yet read, or read and not acked (pending on a worker that may have
        died, until another takes it over). Dropping here, counted, keeps MAXLEN trimming from
        silently discarding frames detect has not finished.
        """
        now = time.monotonic()
        if now - self._lag_checked >= 0.5:
            self._lag_checked = now
            stats = group_stats(self.r, self.stream, self.opts.detect_group, self.opts.backpressure_lag)
            self._lag = stats.lag + stats.pending if stats is not None else 0
        return self._lag >= self.opts.backpressure_lag

    def _publish(self, frame: Frame) -> None:
        if time.monotonic() < self._redis_retry_at:
            # Redis refused the last frame: drop (counted) until the backoff has passed, and keep
            # reading, so a file keeps its pace and a live camera's buffer is drained meanwhile.
            self.metrics.drop(self.cam.id, self._redis_refusal)
            return
        try:
            with self.clock.writing():
                backlogged = self._backlogged()
            if backlogged:
                self.metrics.drop(self.cam.id, "backpressure")
                return
        except TRANSIENT_ERRORS:
            pass  # counted below when the XADD fails too
        jpeg = self._encode(frame)
        if jpeg is None:
            return
        h, w = frame.image.shape[:2]
        scale = min(1.0, self.opts.max_width / w)
        try:
            with self.clock.writing():
                msg = FrameMsg(camera=self.cam.id, seq=self.seq.next(), capture_ts=frame.capture_ts,
                               width=round(w * scale), height=round(h * scale), jpeg=jpeg)
                self.r.xadd(self.stream, {FIELD: encode_frame(msg)}, maxlen=self.opts.stream_maxlen,
                            approximate=True)
        except TRANSIENT_ERRORS as exc:
            # Out of memory and READONLY pass like an outage does: drop (counted), back off, go on.
            self._redis_refusal = refusal_reason(exc)
            self.metrics.drop(self.cam.id, self._redis_refusal)
            self.metrics.redis_errors.inc()
            delay = self._redis_backoff.next_delay()
            self._redis_retry_at = time.monotonic() + delay
            log.warning("camera %s: %s (%s); dropping frames for %.2fs", self.cam.id, self._redis_refusal, exc,
                        delay)
            return
        self._redis_backoff.reset()
        self._published += 1
        self.metrics.published.labels(camera=self.cam.id).inc()

    def status(self, owner: str) -> dict[str, object]:
        """For ``emotion-stream cameras status``: state, published fps since the last call, errors."""
        now = time.monotonic()
        since, count = self._rate_mark
        self._rate_mark = (now, self._published)
        fps = (self._published - count) / (now - since) if now > since else 0.0
        return {"owner": owner, "state": self.state.value, "fps": round(fps, 2),
                "last_frame_age_s": round(now - self.last_frame, 2), "last_error": self.last_error,
                "url": self.source.safe_url}


class IngestWorker:
    """Runs the camera readers and the watchdog until stopped (or, with static files, until they end).

    Static mode reads the cameras of the settings file. Dynamic mode (``ingest.dynamic``) reads
    them from Redis, seeded by the file: replicas share the cameras through leases
    (:class:`~shared.camera_ownership.CameraOwnership`), and cameras added, changed or removed
    take effect within ``refresh_s``. A camera is only read while its lease is held, so no two
    replicas read it. A reader thread that died is replaced (static) or its camera given up
    (dynamic), never left holding the camera.
    """

    def __init__(self, settings: IngestSettings, r: redis.Redis, metrics: IngestMetrics,
                 stopper: Stopper | None = None) -> None:
        self.settings = settings
        self.opts = settings.ingest
        self.r = r
        self.metrics = metrics
        self.stopper = stopper or Stopper()
        self.keys = Keys(settings.redis.prefix)
        self.heartbeat = Heartbeat(metrics.heartbeat)
        self.replica = settings.consumer or default_consumer_name()
        self.registry = CameraRegistry(r, settings.redis.prefix, settings.ingest.policy())
        self.ownership = CameraOwnership(self.registry, self.replica, settings.cameras, self.opts.lease_s)
        self.readers: dict[str, CameraReader] = {}
        self._leaving: list[CameraReader] = []

    def run(self) -> None:
        if not self.opts.dynamic:
            for cam in self.settings.cameras:
                self._start(cam)
        else:
            self._seed()
        last_sync = 0.0
        while not self.stopper.stopping:
            self.heartbeat.beat()
            if time.monotonic() - last_sync >= (self.opts.refresh_s if self.opts.dynamic else 2.0):
                last_sync = time.monotonic() if self._sync_safely() else 0.0
            self._watchdog()
            self._reap()
            if not self.opts.dynamic:
                self._revive()
            if not self.opts.dynamic and self.readers and all(
                    r.state is SourceState.ENDED for r in self.readers.values()):
                log.info("all inputs ended")
                break
            self.stopper.wait(0.2)
        self._shutdown()

    def _seed(self) -> None:
        while not self.stopper.stopping:
            try:
                self.ownership.seed()
                return
            except TRANSIENT_ERRORS as exc:
                self.metrics.redis_errors.inc()
                log.warning("cannot seed cameras into Redis: %s", exc)
                self.stopper.wait(1.0)

    def _shutdown(self) -> None:
        self.stopper.stop()
        for reader in [*self.readers.values(), *self._leaving]:
            reader.join(timeout=self.settings.streams.drain_timeout_s)
        if self.opts.dynamic:
            with contextlib.suppress(*TRANSIENT_ERRORS):  # else the leases lapse on their own
                self.ownership.leave(list(self.readers))

    def _start(self, cam: CameraSettings) -> None:
        reader = CameraReader(cam, self.settings, self.r, self.metrics, ChildStopper(self.stopper))
        self.readers[cam.id] = reader
        reader.start()
        log.info("camera %s: reading on replica %s", cam.id, self.replica)

    def _stop(self, cid: str, why: str) -> None:
        reader = self.readers.pop(cid)
        reader.stopper.stop()
        self._leaving.append(reader)
        log.info("camera %s: stopped on replica %s (%s)", cid, self.replica, why)

    def _revive(self) -> None:
        """Static mode: a reader thread that ended without its file ending is replaced."""
        for cid, reader in list(self.readers.items()):
            if not reader.is_alive() and reader.state is not SourceState.ENDED:
                log.error("camera %s: reader thread ended unexpectedly (%s); starting a new one", cid,
                          reader.last_error or "no error recorded")
                self.metrics.reconnects.labels(camera=cid).inc()
                self._start(reader.cam)

    def _reap(self) -> None:
        """Release a stopped camera's lease only once its thread is gone: never two readers at once."""
        for reader in [r for r in self._leaving if not r.is_alive()]:
            self._leaving.remove(reader)
            if self.opts.dynamic and reader.cam.id not in self.readers:
                with contextlib.suppress(*TRANSIENT_ERRORS):
                    self.ownership.release(reader.cam.id)

    def _sync_safely(self) -> bool:
        try:
            if self.opts.dynamic:
                self._sync()
            self._register()
            return True
        except TRANSIENT_ERRORS as exc:
            self.metrics.redis_errors.inc()
            log.warning("Redis unavailable (%s)", exc)
            self._expire_local_leases()
            return False

    def _expire_local_leases(self) -> None:
        """Without Redis no lease can be renewed: stop reading before another replica may start."""
        if not self.opts.dynamic:
            return
        for cid in self.ownership.lapsed({c: r.cam for c, r in self.readers.items()}):
            self._stop(cid, "lease could not be renewed")

    def _sync(self) -> None:
        running = {cid: reader.cam for cid, reader in self.readers.items()}
        plan = self.ownership.plan(running, alive=lambda cid: self.readers[cid].is_alive(),
                                   leaving={r.cam.id for r in self._leaving})
        for stop in plan.stop:
            self._stop(stop.camera, stop.why)
        for cam in plan.start:
            self._start(cam)
        self._write_status()

    def _register(self) -> None:
        """Announce the cameras so detect workers find their streams (again, after a Redis restart)."""
        ids = list(self.readers)
        if ids:
            self.r.sadd(self.keys.cameras, *ids)

    def _write_status(self) -> None:
        for cid, reader in self.readers.items():
            self.registry.write_status(cid, reader.status(self.replica))

    def _watchdog(self) -> None:
        now = time.monotonic()
        for reader in self.readers.values():
            age = now - reader.last_frame
            self.metrics.frame_age.labels(camera=reader.cam.id).set(age if reader.state is SourceState.UP else 0)
            if reader.state is SourceState.UP and age > self.opts.watchdog_s and not reader.stalled.is_set():
                log.warning("camera %s: no frame for %.1fs; marking down", reader.cam.id, age)
                reader.stalled.set()
                reader.state = SourceState.DOWN
                reader.last_error = f"no frame for {age:.1f}s (watchdog)"
                self.metrics.up.labels(camera=reader.cam.id).set(0)
                self.metrics.stalls.labels(camera=reader.cam.id).inc()

    def ready(self) -> tuple[bool, str]:
        self.r.ping()
        up = sum(1 for r in self.readers.values() if r.state is SourceState.UP)
        return True, f"redis ok, {up}/{len(self.readers)} cameras up"

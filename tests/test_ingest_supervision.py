"""A camera reader survives what it did not expect: an OpenCV error, a Redis replica that
refuses writes (READONLY, as after a failover); each is counted, and the camera goes on."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cv2
import pytest
from prometheus_client import CollectorRegistry
from support import RedisServer, wait_for

from services.ingest.settings import IngestSettings
from services.ingest.source import SourceState, VideoSource
from services.ingest.worker import CameraReader, IngestMetrics, IngestWorker
from shared.cameras import CameraRegistry
from shared.sample import render_frames, write_video
from shared.streams import Keys, connect
from shared.worker import Stopper

pytestmark = [pytest.mark.integration]
FRAMES = 12


def reader(tmp_path: Path, url: str) -> CameraReader:
    video = write_video(tmp_path / "clip.mp4", render_frames(FRAMES), fps=30)
    settings = IngestSettings(redis={"url": url, "backoff_initial_s": 0.05, "backoff_max_s": 0.1},
                              cameras=[{"id": "cam", "url": str(video), "fps": 30}])
    return CameraReader(settings.cameras[0], settings, connect(settings.redis), IngestMetrics(CollectorRegistry()),
                        Stopper())


def value(r: CameraReader, name: str, **labels: str) -> float:
    found = r.metrics.registry.get_sample_value(name, {"camera": "cam", **labels})
    assert found is not None, f"no sample {name}{labels}"
    return found


def test_an_opencv_error_mid_file_costs_one_frame_and_the_file_goes_on(tmp_path: Path, redis_server: RedisServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = VideoSource.retrieve
    calls = {"n": 0}

    def breaks_once(self: VideoSource) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise cv2.error("decoder fell over")
        return real(self)

    monkeypatch.setattr(VideoSource, "retrieve", breaks_once)
    cam = reader(tmp_path, redis_server.url)
    cam.start()
    cam.join(30)
    assert not cam.is_alive() and cam.state is SourceState.ENDED, "the reader read on to the end of the file"
    assert value(cam, "es_frames_dropped_total", stage="ingest", reason="reader_error") == 1
    assert value(cam, "es_camera_reader_errors_total", reason="reader_error") == 1
    assert redis_server.client().xlen(Keys().frames("cam")) == FRAMES - 1
    assert "decoder fell over" in cam.last_error


def test_a_read_only_replica_drops_frames_as_redis_readonly_and_the_camera_stays_up(tmp_path: Path,
                                                                                    redis_server: RedisServer) -> None:
    replica = RedisServer(["--replicaof", "127.0.0.1", str(redis_server.port)]).start()
    try:
        cam = reader(tmp_path, replica.url)
        cam.cam = cam.cam.model_copy(update={"loop": True})
        cam.source = VideoSource(cam.cam, 5.0)
        cam.start()
        wait_for(lambda: (cam.metrics.registry.get_sample_value(
            "es_frames_dropped_total", {"camera": "cam", "stage": "ingest", "reason": "redis_readonly"}) or 0) >= 3,
            30, what="frames dropped as redis_readonly")
        assert cam.is_alive() and value(cam, "es_camera_up") == 1.0
        cam.stopper.stop()
        cam.join(10)
    finally:
        replica.stop()


class ThreadKilled(BaseException):
    """Escapes the reader's ``except Exception``: what ends a reader thread despite its supervision."""


def kill_first_reader(monkeypatch: pytest.MonkeyPatch) -> list[CameraReader]:
    """The first reader to enter its read loop dies there; the readers that died are listed."""
    real = CameraReader._read_loop
    died: list[CameraReader] = []

    def dies_once(self: CameraReader) -> None:
        if not died:
            died.append(self)
            raise ThreadKilled
        real(self)

    monkeypatch.setattr(CameraReader, "_read_loop", dies_once)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is the point: no traceback
    return died


def run_ingest(settings: IngestSettings) -> tuple[IngestWorker, Stopper, threading.Thread]:
    stopper = Stopper()
    worker = IngestWorker(settings, connect(settings.redis), IngestMetrics(CollectorRegistry()), stopper)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, stopper, thread


def test_a_reader_thread_that_dies_is_replaced_and_the_camera_read_again(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    died = kill_first_reader(monkeypatch)
    video = write_video(tmp_path / "clip.mp4", render_frames(FRAMES), fps=10)
    settings = IngestSettings(redis={"url": redis_server.url}, metrics={"enabled": False},
                              cameras=[{"id": "cam", "url": str(video), "fps": 10, "loop": True}])
    worker, stopper, thread = run_ingest(settings)
    r = redis_server.client()
    try:
        wait_for(lambda: died and not died[0].is_alive(), 20, what="the first reader thread dead")
        assert died[0].state is SourceState.STOPPED
        replaced = wait_for(lambda: (new := worker.readers.get("cam")) is not died[0] and new, 10,
                            what="a new reader for the camera")
        wait_for(lambda: r.xlen(Keys().frames("cam")) >= 5, 20, what="frames from the new reader")
        assert replaced.is_alive()
        assert worker.metrics.registry.get_sample_value("es_camera_reconnects_total", {"camera": "cam"}) >= 1
    finally:
        stopper.stop()
        thread.join(15)


def test_a_dynamic_camera_whose_reader_died_is_released_not_held_until_its_lease_lapses(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    died = kill_first_reader(monkeypatch)
    video = write_video(tmp_path / "clip.mp4", render_frames(FRAMES), fps=10)
    settings = IngestSettings(redis={"url": redis_server.url}, metrics={"enabled": False}, consumer="one",
                              ingest={"dynamic": True, "lease_s": 60.0, "refresh_s": 0.2},
                              cameras=[{"id": "cam", "url": str(video), "fps": 10, "loop": True}])
    worker, stopper, thread = run_ingest(settings)
    registry = CameraRegistry(redis_server.client())
    try:
        wait_for(lambda: died and not died[0].is_alive(), 20, what="the reader thread dead")
        # A 60 s lease: another replica gets the camera within seconds only if it was released.
        wait_for(lambda: registry.hold("cam", "two", 60.0), 10, interval=0.01, what="the camera released")
        assert registry.owner("cam") == "two"
        time.sleep(1.0)  # replica one's next passes leave it with its owner
        assert registry.owner("cam") == "two" and "cam" not in worker.readers
    finally:
        stopper.stop()
        thread.join(15)

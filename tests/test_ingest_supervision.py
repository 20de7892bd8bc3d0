"""A camera reader survives what it did not expect: an OpenCV error, a Redis replica that
refuses writes (READONLY, as after a failover); each is counted, and the camera goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import pytest
from prometheus_client import CollectorRegistry
from support import RedisServer, wait_for

from services.ingest.settings import IngestSettings
from services.ingest.source import SourceState, VideoSource
from services.ingest.worker import CameraReader, IngestMetrics
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

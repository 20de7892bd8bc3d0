"""Where a frame waits: each stage's loop time split into waiting for input, working and writing.

The real worker loops run against a real redis-server on real frames; the phase histogram
(``es_stage_phase_seconds``) must say what the loop did: an idle worker waits, a busy one works
and writes, a file camera paced at a low fps mostly waits for its next frame slot, and the
phases add up to the loop's wall time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import pytest
import redis
from prometheus_client import CollectorRegistry
from support import RedisServer, wait_for

from services.detect.settings import DetectSettings
from services.detect.worker import DetectMetrics, DetectWorker
from services.ingest.settings import IngestSettings
from services.ingest.worker import IngestMetrics, IngestWorker
from shared.detection import make_camera_detector
from shared.imaging import to_gray
from shared.sample import render_frames, write_video
from shared.schema import FIELD, FrameMsg, encode_frame
from shared.streams import Keys, connect, ensure_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
KEYS = Keys()


def phase(registry: CollectorRegistry, stage: str, name: str) -> tuple[float, float]:
    """(seconds, passes) the stage's loop spent in a phase."""
    labels = {"stage": stage, "phase": name}
    return (registry.get_sample_value("es_stage_phase_seconds_sum", labels) or 0.0,
            registry.get_sample_value("es_stage_phase_seconds_count", labels) or 0.0)


def loop_seconds(registry: CollectorRegistry, stage: str) -> float:
    return sum(phase(registry, stage, p)[0] for p in ("wait", "work", "write"))


def detect_worker(url: str) -> tuple[DetectWorker, CollectorRegistry, redis.Redis]:
    settings = DetectSettings.model_validate({"redis": {"url": url}, "consumer": "detect-a",
                                              "detect": {"max_frame_age_s": 60}})
    r = connect(settings.redis)
    r.sadd(KEYS.cameras, "cam0")
    ensure_group(r, KEYS.frames("cam0"), settings.detect.group)
    registry = CollectorRegistry()
    worker = DetectWorker(settings, r, make_camera_detector(settings.detector), DetectMetrics(registry))
    return worker, registry, r


def timed_steps(worker: DetectWorker, until: float) -> float:
    """Run the worker's loop steps until the monotonic time ``until``; their wall time."""
    wall = 0.0
    while time.monotonic() < until:
        began = time.perf_counter()
        worker.step()
        wall += time.perf_counter() - began
    return wall


def test_an_idle_detect_worker_is_seen_waiting(redis_server: RedisServer) -> None:
    worker, registry, _ = detect_worker(redis_server.url)
    worker.step()  # takes the camera's lease
    before = {p: phase(registry, "detect", p) for p in ("wait", "work", "write")}
    wall = timed_steps(worker, time.monotonic() + 1.5)
    waited = phase(registry, "detect", "wait")[0] - before["wait"][0]
    worked = phase(registry, "detect", "work")[0] - before["work"][0]
    assert waited > 0.8 * wall, (waited, worked, wall)
    assert phase(registry, "detect", "write")[1] == 0  # nothing was written
    assert waited + worked == pytest.approx(wall, rel=0.05)


def test_a_busy_detect_worker_is_seen_working_and_writing(redis_server: RedisServer) -> None:
    worker, registry, r = detect_worker(redis_server.url)
    frames = [to_gray(f) for f in render_frames(24)]
    pipe = r.pipeline(transaction=False)
    for seq, frame in enumerate(frames):
        jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
        msg = FrameMsg("cam0", seq, time.time(), frame.shape[1], frame.shape[0], jpeg)
        pipe.xadd(KEYS.frames("cam0"), {FIELD: encode_frame(msg)})
    pipe.execute()
    wall = 0.0
    deadline = time.monotonic() + 60
    while (registry.get_sample_value("es_detect_frames_total", {"camera": "cam0"}) or 0) < len(frames):
        assert time.monotonic() < deadline, "frames not processed"
        began = time.perf_counter()
        worker.step()
        wall += time.perf_counter() - began
    assert r.xlen(KEYS.faces) > 0  # faces were found and written
    waited, worked, wrote = (phase(registry, "detect", p) for p in ("wait", "work", "write"))
    assert worked[0] > waited[0], (waited, worked)
    assert wrote[0] > 0 and 1 <= wrote[1] <= len(frames), wrote  # one EXEC per batch read
    assert waited[0] + worked[0] + wrote[0] == pytest.approx(wall, rel=0.05)


def test_a_paced_file_camera_is_seen_waiting_for_its_frames(tmp_path: Path, redis_server: RedisServer) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(20), fps=10)
    settings = IngestSettings.model_validate({"redis": {"url": redis_server.url},
                                              "cameras": [{"id": "cam0", "url": str(video), "fps": 5, "loop": True}]})
    registry = CollectorRegistry()
    worker = IngestWorker(settings, connect(settings.redis), IngestMetrics(registry))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: (registry.get_sample_value("es_frames_published_total", {"camera": "cam0"}) or 0) >= 8,
                 30, interval=0.1, what="8 frames published")
    finally:
        worker.stopper.stop()
        thread.join(10)
    published = registry.get_sample_value("es_frames_published_total", {"camera": "cam0"}) or 0
    waited, worked, wrote = (phase(registry, "ingest", p) for p in ("wait", "work", "write"))
    # At 5 fps a frame's slot comes every 200 ms; reading, encoding and publishing it take a few.
    assert waited[0] > 0.7 * loop_seconds(registry, "ingest"), (waited, worked, wrote)
    assert worked[0] > 0
    assert wrote[0] > 0 and wrote[1] == published, (wrote, published)

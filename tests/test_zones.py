"""Masks and zones per camera: validation by field, and detect's hooks on a real worker and Redis.

The frames hold the astronaut's head twice on a photograph (left and right); a detect worker
runs in this process on a real Redis, with the service's own motion-gated detector, recorded on
its way in so the test sees exactly what the detector was given.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from skimage import data
from support import REPO, RedisServer, outside_env, wait_for

from services.detect.settings import DetectSettings
from services.detect.worker import DetectMetrics, DetectWorker
from shared.cameras import CameraRegistry, CameraSettings
from shared.detection import DetectorSettings, make_camera_detector
from shared.events import EventFilter
from shared.schema import FIELD, Box, EventMsg, FacesMsg, FrameMsg, decode_faces, encode_frame
from shared.streams import Keys
from shared.zones import CameraGeometry, geometry_errors, parse_zone, point_in_polygon

KEYS = Keys()
LEFT_HALF: list[list[float]] = [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]
RIGHT_HALF: list[list[float]] = [[300, 0], [600, 0], [600, 400], [300, 400]]  # pixels of the 600x400 frame


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def two_faces() -> np.ndarray:
    """600x400: the same head at the left (centre near 124,184) and at the right (near 485,184)."""
    frame = grey(data.coffee())
    head = grey(data.astronaut())[30:210, 140:310]
    frame[100:280, 40:210] = head
    frame[100:280, 400:570] = head
    return frame


def errors(**fields: Any) -> list[str]:
    with pytest.raises(ValidationError) as info:
        CameraSettings.model_validate({"id": "cam0", "url": "a.mp4", **fields})
    return geometry_errors(info.value)


def test_zone_and_mask_errors_name_the_field() -> None:
    bad_point = errors(zones=[{"name": "door", "points": LEFT_HALF},
                              {"name": "desk", "points": [[0, 0], [1, 0], [2, -1]]}])
    assert bad_point == ["zones[1].points[2]: coordinates must be finite, 0..100000 (pixels) or 0..1 (fractions) "
                         "(got [2, -1])"]
    assert errors(mask=[[[0, 0], [1, 1]]])[0].startswith("mask[0]: List should have at least 3 items")
    assert errors(mask=[[[0, 0], [0.5, 0.5], [1, 1]]]) == [
        "mask[0]: the polygon has no area (its points lie on one line) (got [[0, 0], [0.5, 0.5], [1, 1]])"]
    assert errors(zones=[{"name": "a", "points": LEFT_HALF}, {"name": "a", "points": RIGHT_HALF}]) == [
        "zones[1].name: zone 'a' is defined twice"]
    assert errors(zones=[{"name": "none", "points": LEFT_HALF}])[0].startswith(
        "zones[0].name: 'none' is reserved")
    assert errors(zones=[{"name": "front door", "points": LEFT_HALF}])[0].startswith(
        "zones[0].name: zone names are 1-32 letters")
    with pytest.raises(ValueError, match=re.escape("point 1 '0.5,x': coordinates must be numbers")):
        parse_zone("door=0,0 0.5,x 1,1")


def test_zone_membership_by_face_centre_in_pixels_or_fractions() -> None:
    cam = CameraSettings.model_validate({"id": "cam0", "url": "a.mp4", "zones": [
        {"name": "left", "points": LEFT_HALF}, {"name": "right", "points": RIGHT_HALF},
        {"name": "all", "points": [[0, 0], [1, 0], [1, 1], [0, 1]]}]})
    geometry = CameraGeometry.of(cam)
    assert geometry is not None
    assert geometry.zones_of(Box(76, 136, 96, 96), 600, 400) == ("left", "all")
    assert geometry.zones_of(Box(438, 136, 95, 95), 600, 400) == ("right", "all")
    assert not point_in_polygon(0.7, 0.2, LEFT_HALF) and point_in_polygon(0.2, 0.7, LEFT_HALF)
    filt = EventFilter(zones=frozenset({"right"}))
    assert filt.in_zones(("right", "all")) and not filt.in_zones(("left", "all")) and not filt.in_zones(())
    assert EventFilter(zones=frozenset({"none"})).in_zones(()) and not EventFilter(zones=frozenset({"none"})).in_zones(
        ("left",))


class Recording:
    """The service's camera detector, with every frame it is given kept for the test to inspect."""

    def __init__(self) -> None:
        self.inner = make_camera_detector(DetectorSettings())
        self.given: list[np.ndarray] = []
        self.reports: list[Any] = []

    @property
    def last(self) -> Any:
        return self.inner.last

    def detect(self, gray: np.ndarray, camera: str = "", ts: float | None = None, lag_s: float = 0.0) -> list[Box]:
        self.given.append(gray.copy())
        found = self.inner.detect(gray, camera, ts, lag_s=lag_s)
        self.reports.append(self.inner.last)  # what this frame cost: motion seen, pixels searched
        return found

    def forget(self, camera: str) -> None:
        self.inner.forget(camera)


def run_detect(server: RedisServer, cam: dict[str, Any], frame: np.ndarray | list[np.ndarray], n: int) -> tuple[
        list[FacesMsg], Recording, CollectorRegistry]:
    """``n`` frames (``frame`` each time, or the list's in turn) through an in-process detect worker
    configured with ``cam``."""
    frames = frame if isinstance(frame, list) else [frame] * n
    r = server.client()
    settings = DetectSettings.model_validate({
        "redis": {"url": server.url}, "consumer": "detect-test", "streams": {"block_ms": 100},
        "detect": {"max_frame_age_s": 600, "cameras_refresh_s": 0.2},
        "cameras": [{"id": "cam0", "url": "a.mp4", **cam}]})
    registry = CollectorRegistry()
    recording = Recording()
    worker = DetectWorker(settings, r, recording, DetectMetrics(registry))  # type: ignore[arg-type]
    r.sadd(KEYS.cameras, "cam0")
    h, w = frames[0].shape[:2]
    start = time.time()
    for seq in range(n):
        jpeg = cv2.imencode(".png", frames[seq])[1].tobytes()  # lossless: the test compares pixels
        msg = FrameMsg(camera="cam0", seq=seq, capture_ts=start + seq * 0.1, width=w, height=h, jpeg=jpeg)
        r.xadd(KEYS.frames("cam0"), {FIELD: encode_frame(msg)})

    def done() -> bool:
        worker.step()
        return len(recording.given) >= n

    wait_for(done, 60, interval=0.0, what="frames detected")
    faces = [decode_faces(f[FIELD]) for _, f in r.xrange(KEYS.faces)]
    return faces, recording, registry


def test_masked_region_is_blanked_before_detection_and_yields_no_faces(redis_server: RedisServer) -> None:
    frame = two_faces()
    premise = make_camera_detector(DetectorSettings()).detect(frame, "x", 0.0)
    assert sorted(b.x < 300 for b in premise) == [False, True], premise  # both heads are found unmasked

    faces, recording, registry = run_detect(redis_server, {"mask": [LEFT_HALF]}, frame, 6)

    for given in recording.given:  # what the detector (and its motion analysis) saw
        assert not given[:, :300].any(), "the masked half must reach the detector blanked"
        assert np.array_equal(given[:, 301:], frame[:, 301:]), "the rest of the frame must be untouched"
    assert len(faces) == 6
    for msg in faces:
        assert [f.box.x > 300 for f in msg.faces] == [True], msg.faces  # only the right head
    assert registry.get_sample_value("es_detect_masked_frames_total", {"camera": "cam0"}) == 6
    assert registry.get_sample_value("es_detect_faces_total", {"camera": "cam0", "zone": "none"}) == 6


def test_face_whose_centre_is_masked_is_dropped_and_counted(redis_server: RedisServer) -> None:
    """A small mask over the left face's centre: the face is still found around it, and dropped."""
    frame = two_faces()
    centre_patch = [[120, 180], [127, 180], [127, 187], [120, 187]]
    blanked = frame.copy()
    blanked[180:188, 120:128] = 0
    premise = make_camera_detector(DetectorSettings()).detect(blanked, "x", 0.0)
    assert len(premise) == 2, f"the premise: the left face is found despite the patch ({premise})"

    faces, _, registry = run_detect(redis_server, {"mask": [centre_patch]}, frame, 4)

    assert all([f.box.x > 300 for f in msg.faces] == [True] for msg in faces), [m.faces for m in faces]
    dropped = registry.get_sample_value("es_detect_faces_dropped_total", {"camera": "cam0", "reason": "mask"})
    assert dropped == 4


def test_faces_carry_their_zones_and_count_under_the_first(redis_server: RedisServer) -> None:
    zones = [{"name": "right", "points": RIGHT_HALF}, {"name": "upper", "points": [[0, 0], [1, 0], [1, 0.6], [0, 0.6]]}]
    faces, _, registry = run_detect(redis_server, {"zones": zones}, two_faces(), 3)

    assert len(faces) == 3
    for msg in faces:
        by_side = {("right" if f.box.x > 300 else "left"): f.zones for f in msg.faces}
        assert by_side == {"left": ("upper",), "right": ("right", "upper")}
    assert registry.get_sample_value("es_detect_faces_total", {"camera": "cam0", "zone": "right"}) == 3
    assert registry.get_sample_value("es_detect_faces_total", {"camera": "cam0", "zone": "upper"}) == 3


def test_zones_reach_the_event_json() -> None:
    ev = EventMsg(event_id="c:1:0", camera="c", seq=1, face=0, capture_ts=1.0, publish_ts=1.1, box=Box(1, 1, 9, 9),
                  label="Happy", score=0.9, classes=("Happy",), probs=(0.9,), model_version="m", zones=("door",))
    assert ev.to_dict()["zones"] == ["door"]


def cameras_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", "cameras", "--redis-url", url, *args], cwd=REPO,
                          env={**outside_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_cameras_cli_sets_mask_and_zones_and_names_bad_fields(redis_server: RedisServer) -> None:
    registry = CameraRegistry(redis_server.client())
    added = cameras_cli(redis_server.url, "add", "hall", "rtsp://cam.example/hall", "--mask", "0,0 0.3,0 0.3,0.3",
                        "--zone", "door=0.5,0 1,0 1,1 0.5,1", "--zone", "desk=10,300 200,300 200,470")
    assert added.returncode == 0, added.stderr
    cam = registry.cameras()[0]["hall"]
    assert cam.mask == [[(0, 0), (0.3, 0), (0.3, 0.3)]]
    assert [(z.name, len(z.points)) for z in cam.zones] == [("door", 4), ("desk", 3)]

    bad = cameras_cli(redis_server.url, "update", "hall", "--zone", "door=0,0 1,0 1,1", "--zone", "desk=0,0 1,1")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: zones[1].points: List should have at least 3 items"), bad.stderr
    unparsable = cameras_cli(redis_server.url, "update", "hall", "--mask", "0,0 0.5;x")
    assert unparsable.returncode == 2 and "mask[0]: point 1 '0.5' is not 'x,y'" in unparsable.stderr

    # an update without geometry options keeps them; --clear-mask drops the mask only
    assert cameras_cli(redis_server.url, "update", "hall", "--fps", "3").returncode == 0
    assert registry.cameras()[0]["hall"].zones == cam.zones
    assert cameras_cli(redis_server.url, "update", "hall", "--clear-mask").returncode == 0
    assert registry.cameras()[0]["hall"].mask == [] and registry.cameras()[0]["hall"].zones == cam.zones
    listed = cameras_cli(redis_server.url, "list")
    assert "mask=0\tzones=door,desk" in listed.stdout, listed.stdout


def test_motion_under_the_mask_is_not_seen(redis_server: RedisServer) -> None:
    """The left head moves on every frame, the right one stands still: with the left half masked
    the camera looks still (no motion, and no detector run between the still face's rechecks)."""
    frames = []
    for i in range(8):
        frame = two_faces()
        frame[:, :300] = grey(data.coffee())[:, :300]
        x = 10 + 12 * i
        frame[100:280, x:x + 170] = grey(data.astronaut())[30:210, 140:310]
        frames.append(frame)
    _, unmasked, _ = run_detect(redis_server, {}, frames, 8)
    assert all(r.moved > 0.01 for r in unmasked.reports[1:]), [r.moved for r in unmasked.reports]

    redis_server.client().flushall()
    _, masked, registry = run_detect(redis_server, {"mask": [LEFT_HALF]}, frames, 8)
    assert [r.moved for r in masked.reports[1:]] == [0.0] * 7
    skipped = sum(r.skipped for r in masked.reports)
    assert skipped >= 3, "frames where nothing moved cost no detector run (between the still face's rechecks)"
    assert registry.get_sample_value("es_detect_motionless_frames_total", {"camera": "cam0"}) == skipped

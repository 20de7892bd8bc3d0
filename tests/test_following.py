"""A face once found stays found while it is there, and keeps one track.

Real images (scikit-image's photographs): the astronaut's head pasted into the coffee scene, as
in test_motion. The detector under the gate is the real Haar cascade, wrapped where a test needs
it to fire only now and then (as Haar does on real footage: pose, blur, a hand) or to count its
runs. Frames carry explicit capture times 0.1 s apart (10 fps). The tracker is the classify
service's, fed each frame with faces as the pipeline feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage import data

from shared.detection import DetectorSettings, GatedDetector, HaarDetector, make_camera_detector
from shared.imaging import UInt8Array
from shared.model_bundle import FER2013_CLASSES
from shared.motion import MotionSettings
from shared.schema import Box
from shared.tracking import CameraTracker, Detection, TrackerSettings

STEP_S = 0.1
COFFEE = np.ascontiguousarray(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2GRAY))  # 400 x 600
HEAD = np.ascontiguousarray(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY))[30:210, 140:310]  # 180 x 170
PROBS = np.full(len(FER2013_CLASSES), 1.0 / len(FER2013_CLASSES))


def scene(*heads: tuple[int, int], cover: tuple[int, int] | None = None) -> UInt8Array:
    """The coffee scene with a head at each (x, y); ``cover`` puts a flat 'hand' over the head there."""
    frame = COFFEE.copy()
    for x, y in heads:  # clipped at the right edge (a head walking out)
        w = min(HEAD.shape[1], frame.shape[1] - x)
        frame[y:y + HEAD.shape[0], x:x + w] = HEAD[:, :w]
    if cover is not None:
        x, y = cover
        frame[y + 20:y + 160, x + 10:x + 160] = 150
    return frame


def holds(box: Box, head_at: tuple[int, int]) -> bool:
    """The box's centre lies on the pasted head."""
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    x, y = head_at
    return x <= cx <= x + HEAD.shape[1] and y <= cy <= y + HEAD.shape[0]


@dataclass
class Intermittent:
    """The real Haar detector that fires only on every ``every``-th frame (``frame`` set by the
    test), as Haar does on a real face; counts its runs."""

    every: int = 1
    frame: int = 0
    calls: int = 0
    base: HaarDetector = field(default_factory=lambda: HaarDetector(DetectorSettings()))

    def detect(self, gray: UInt8Array) -> list[Box]:
        self.calls += 1
        return self.base.detect(gray) if self.frame % self.every == 0 else []

    def detect_near(self, gray: UInt8Array, side: int) -> list[Box]:
        self.calls += 1
        return self.base.detect_near(gray, side) if self.frame % self.every == 0 else []


def gate(base: Intermittent, **motion: float) -> GatedDetector:
    detector = make_camera_detector(DetectorSettings(motion=MotionSettings(**motion)), base=base)
    assert isinstance(detector, GatedDetector)
    return detector


def track(tracker: CameraTracker, ts: float, boxes: list[Box]) -> list[int | None]:
    if not boxes:  # frames without faces never reach classify's tracker
        return []
    ids, _ = tracker.update(ts, [Detection(b, PROBS) for b in boxes])
    return ids


def test_a_face_the_detector_finds_only_on_every_third_frame_is_reported_on_every_frame_with_one_track() -> None:
    base = Intermittent(every=3)
    detector = gate(base)
    tracker = CameraTracker("cam", FER2013_CLASSES, TrackerSettings())
    for i in range(6):  # the empty scene first: its background is learnt
        base.frame = i
        detector.detect(COFFEE, "cam", i * STEP_S)
    ids: set[int | None] = set()
    for i in range(6, 66):  # 6 s, the head in from a frame where the detector fires; it walks
        base.frame = i  # right 3 px a frame, so it is never "still"
        at = (120 + 3 * (i - 6), 120)
        boxes = detector.detect(scene(at), "cam", i * STEP_S)
        # (whole-frame searches, every full_search_s, may also find what Haar takes for a face
        # in the coffee scene: only the head's box matters here)
        assert sum(1 for b in boxes if holds(b, at)) == 1, (i, at, boxes)
        ids.update(t for b, t in zip(boxes, track(tracker, i * STEP_S, boxes), strict=True) if holds(b, at))
    assert len(ids) == 1, ids


def test_a_face_covered_by_a_hand_for_half_a_second_keeps_its_track_and_is_not_reported_meanwhile() -> None:
    """A second, still person keeps every frame flowing to the tracker, as in a meeting."""
    base = Intermittent()
    detector = gate(base)
    tracker = CameraTracker("cam", FER2013_CLASSES, TrackerSettings())
    left, right = (60, 110), (360, 110)
    first: dict[tuple[int, int], set[int | None]] = {left: set(), right: set()}
    for i in range(5):
        detector.detect(COFFEE, "cam", i * STEP_S)
    covered = range(15, 20)  # 0.5 s
    for i in range(5, 40):
        frame = scene(left, right, cover=right if i in covered else None)
        boxes = detector.detect(frame, "cam", i * STEP_S)
        on_right = [b for b in boxes if holds(b, right)]
        if i in covered:
            assert not on_right, (i, boxes)  # a hand is not a face: no box outlives what it showed
        else:
            assert len(on_right) == 1 and any(holds(b, left) for b in boxes), (i, boxes)
        for box, tid in zip(boxes, track(tracker, i * STEP_S, boxes), strict=True):
            first[left if holds(box, left) else right].add(tid)
    assert len(first[left]) == 1 and len(first[right]) == 1 and first[left] != first[right], first


def test_a_face_that_leaves_the_frame_ends_its_track_within_forget_after_s() -> None:
    base = Intermittent()
    detector = gate(base)
    settings = TrackerSettings()
    tracker = CameraTracker("cam", FER2013_CLASSES, settings)
    stays, walker_y = (40, 150), 60
    for i in range(5):
        detector.detect(COFFEE, "cam", i * STEP_S)
    left_at = None
    ended: list[float] = []
    for i in range(5, 80):
        x = 330 + 20 * (i - 5)  # walks out to the right; gone after a dozen frames
        heads = [stays] + ([(x, walker_y)] if x < COFFEE.shape[1] else [])
        boxes = detector.detect(scene(*heads), "cam", i * STEP_S)
        if x >= COFFEE.shape[1] - HEAD.shape[1] // 2 and left_at is None:
            left_at = i * STEP_S  # half of the head is out
        if left_at is not None and i * STEP_S > left_at + MotionSettings().max_unconfirmed_s:
            assert all(holds(b, stays) for b in boxes), (i, boxes)  # no box outlives the walker
        _, events = tracker.update(i * STEP_S, [Detection(b, PROBS) for b in boxes])
        ended += [e.ts for e in events if e.kind == "ended"]
    assert left_at is not None and len(ended) == 1, ended
    assert ended[0] - left_at <= settings.max_gap_s + STEP_S, (ended, left_at)
    assert [t.box for t in tracker.tracks if holds(t.box, stays)], "the person who stayed keeps a track"


def test_a_still_poster_face_is_found_once_and_then_costs_no_detector_run_until_its_interval() -> None:
    base = Intermittent()
    settings = MotionSettings()
    detector = gate(base)
    poster = scene((300, 120))
    found = detector.detect(poster, "cam", 0.0)  # the camera's first frame: the whole frame
    assert len(found) == 1 and base.calls == 1
    recheck = round(settings.still_recheck_s / STEP_S)
    for i in range(1, recheck):
        assert len(detector.detect(poster, "cam", i * STEP_S)) == 1
        assert base.calls == 1, f"frame {i}: the detector ran again before still_recheck_s"
    assert len(detector.detect(poster, "cam", recheck * STEP_S)) == 1
    assert base.calls == 2, "confirmed around the face once still_recheck_s has passed"
    assert detector.last is not None and 0 < detector.last.searched < 0.5, detector.last

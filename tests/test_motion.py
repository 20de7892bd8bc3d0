"""Motion analysis and the motion-gated detector on real images (scikit-image's photographs).

Frames are grey views of real photographs: scikit-image's coffee cup as a still background, the
astronaut's face pasted in as the face. Each camera's frames carry explicit capture times 0.1 s
apart (10 fps), so the gate's timers (foreground rechecks, the whole-frame safety net) are
deterministic.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest
from skimage import data

from shared.detection import DetectorSettings, GatedDetector, HaarDetector, make_camera_detector
from shared.imaging import UInt8Array
from shared.motion import MotionAnalyzer, MotionSettings
from shared.schema import Box

FPS_STEP_S = 0.1


def grey(rgb: np.ndarray) -> UInt8Array:
    return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


COFFEE = grey(data.coffee())  # 400 x 600: the still background
ASTRONAUT = grey(data.astronaut())  # 512 x 512: Haar finds her face at (177, 66), 95 x 95
FACE = ASTRONAUT[30:210, 140:310]  # her head, 180 x 170
FACE_AT = (300, 120)  # where the head is pasted into the coffee scene (x, y)


def with_face(background: UInt8Array = COFFEE, at: tuple[int, int] = FACE_AT) -> UInt8Array:
    frame = background.copy()
    x, y = at
    frame[y:y + FACE.shape[0], x:x + FACE.shape[1]] = FACE
    return frame


def pasted_face_area(at: tuple[int, int] = FACE_AT) -> Box:
    return Box(at[0], at[1], FACE.shape[1], FACE.shape[0])


def inside(inner: Box, outer: Box) -> bool:
    return (outer.x <= inner.x and outer.y <= inner.y and inner.x + inner.w <= outer.x + outer.w
            and inner.y + inner.h <= outer.y + outer.h)


def centre_inside(box: Box, area: Box) -> bool:
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    return area.x <= cx <= area.x + area.w and area.y <= cy <= area.y + area.h


@dataclass
class CountingDetector:
    """The real Haar detector, counting every call (whole frames, regions and follow-ups alike)."""

    base: HaarDetector = field(default_factory=lambda: HaarDetector(DetectorSettings()))
    calls: int = 0

    def detect(self, gray: UInt8Array) -> list[Box]:
        self.calls += 1
        return self.base.detect(gray)

    def detect_near(self, gray: UInt8Array, side: int) -> list[Box]:
        self.calls += 1
        return self.base.detect_near(gray, side)


# These tests look at what happens between the whole-frame safety-net searches: those come every
# SAFETY_NET_S here (the default, full_search_s, is shorter).
SAFETY_NET_S = 5.0


def gated(base: CountingDetector | None = None) -> GatedDetector:
    settings = DetectorSettings(motion=MotionSettings(full_search_s=SAFETY_NET_S))
    detector = make_camera_detector(settings, base=base or CountingDetector())
    assert isinstance(detector, GatedDetector), "motion gating is the default detection path"
    return detector


# -- motion regions ---------------------------------------------------------


def test_a_textured_patch_moving_over_a_still_textured_background_is_a_region_covering_it() -> None:
    patch = np.random.default_rng(7).integers(0, 256, (60, 60), dtype=np.uint8)
    analyzer = MotionAnalyzer(MotionSettings())
    assert analyzer.update(COFFEE).kind == "first"
    assert analyzer.update(COFFEE).boxes == []
    for step in range(6):
        x = 100 + 10 * step
        frame = COFFEE.copy()
        frame[150:210, x:x + 60] = patch
        motion = analyzer.update(frame)
        where = Box(x, 150, 60, 60)
        assert motion.kind == "local", step
        assert any(inside(where, box) for box in motion.boxes), (step, where, motion.boxes)
        assert all(box.w <= 120 and box.h <= 120 for box in motion.boxes), motion.boxes  # the patch, not the scene
        assert motion.fraction < 0.05


def test_a_still_scene_has_no_regions_and_the_gate_skips_the_detector_when_no_face_is_known() -> None:
    analyzer = MotionAnalyzer(MotionSettings())
    analyzer.update(COFFEE)
    detector = gated()
    detector.detect(COFFEE, "cam", 0.0)
    for i in range(1, 10):
        motion = analyzer.update(COFFEE)
        assert (motion.kind, motion.boxes, motion.foreground, motion.fraction) == ("local", [], [], 0.0)
        assert detector.detect(COFFEE, "cam", i * FPS_STEP_S) == []
        assert detector.last is not None
        assert detector.last.skipped and detector.last.searched == 0.0 and detector.last.full_reason is None


def noisy(frame: UInt8Array, rng: np.random.Generator, sigma: float = 4.0) -> UInt8Array:
    return np.clip(frame + rng.normal(0.0, sigma, frame.shape), 0, 255).astype(np.uint8)


def test_sensor_noise_below_the_threshold_is_not_motion() -> None:
    rng = np.random.default_rng(3)
    analyzer = MotionAnalyzer(MotionSettings())
    analyzer.update(noisy(COFFEE, rng))
    for _ in range(8):
        motion = analyzer.update(noisy(COFFEE, rng))
        assert (motion.kind, motion.boxes, motion.foreground) == ("local", [], [])
    # The same noise is there to be seen: with a threshold below it, every frame "changes".
    sensitive = MotionAnalyzer(MotionSettings(threshold=2))
    sensitive.update(noisy(COFFEE, rng))
    assert sensitive.update(noisy(COFFEE, rng)).fraction > 0.5


def test_a_global_brightness_change_is_not_motion() -> None:
    dimmed = (COFFEE * 0.75).astype(np.uint8)
    analyzer = MotionAnalyzer(MotionSettings())
    detector = gated()
    for i, frame in enumerate([COFFEE, COFFEE, COFFEE, dimmed, dimmed]):
        motion = analyzer.update(frame)
        detector.detect(frame, "cam", i * FPS_STEP_S)
        if i:
            assert (motion.kind, motion.boxes, motion.foreground) == ("local", [], []), i
            assert detector.last is not None and detector.last.full_reason is None and detector.last.skipped, i
    # Without the compensation the same dimming is a change over the whole frame.
    raw = MotionAnalyzer(MotionSettings(lighting_compensation=False))
    raw.update(COFFEE)
    assert raw.update(dimmed).kind == "cut"


def test_a_hard_cut_is_a_scene_change_and_the_whole_new_frame_is_searched() -> None:
    cat = np.ascontiguousarray(cv2.resize(grey(data.chelsea()), (COFFEE.shape[1], COFFEE.shape[0])))
    other = with_face(cat)  # another place, with someone in it
    analyzer = MotionAnalyzer(MotionSettings())
    kinds = [analyzer.update(frame).kind for frame in (COFFEE, COFFEE, other, other)]
    assert kinds == ["first", "local", "cut", "local"]
    counting = CountingDetector()
    detector = gated(counting)
    detector.detect(COFFEE, "cam", 0.0)
    detector.detect(COFFEE, "cam", 0.1)
    before = counting.calls
    faces = detector.detect(other, "cam", 0.2)
    assert detector.last is not None
    assert detector.last.full_reason == "scene_change" and detector.last.searched == 1.0
    assert counting.calls == before + 1
    assert len(faces) == 1 and centre_inside(faces[0], pasted_face_area()), faces


def panned_view(name: str, step: int, frame: int) -> UInt8Array:
    """A 400 x 400 window of a bigger photograph, moved ``step`` px to the right per frame."""
    images = {"rocket": grey(data.rocket()), "coffee": COFFEE, "astronaut": ASTRONAUT}
    big = images[name]
    return np.ascontiguousarray(big[0:400, step * frame:step * frame + 400])


@pytest.mark.parametrize("photo", ["rocket", "coffee", "astronaut"])
def test_a_view_panned_3px_per_frame_is_camera_motion(photo: str) -> None:
    analyzer = MotionAnalyzer(MotionSettings())
    analyzer.update(panned_view(photo, 3, 0))
    seen = [analyzer.update(panned_view(photo, 3, i)) for i in range(1, 8)]
    assert [m.kind for m in seen] == ["camera"] * 7, [(m.kind, round(m.fraction, 2)) for m in seen]
    for m in seen:  # the window moves right: the content moves 3 px left
        assert m.shift[0] == pytest.approx(-3.0, abs=0.75) and abs(m.shift[1]) < 0.75, m.shift


def test_frames_of_one_camera_are_not_motion_of_another() -> None:
    other = with_face(COFFEE[::-1].copy())
    counting = CountingDetector()
    detector = gated(counting)
    for i in range(12):
        detector.detect(COFFEE, "a", i * FPS_STEP_S)
        assert detector.last is not None and (detector.last.full_reason == "first") == (i == 0), i
        detector.detect(other, "b", i * FPS_STEP_S)
        assert detector.last is not None and (detector.last.full_reason == "first") == (i == 0), i
    assert detector.detect(COFFEE, "a", 1.2) == []
    assert detector.last is not None and detector.last.skipped


# -- faces through the gate -------------------------------------------------


def test_a_face_entering_a_still_scene_is_found_on_its_first_frame_without_a_whole_frame_search() -> None:
    counting = CountingDetector()
    detector = gated(counting)
    for i in range(5):  # the empty scene: its background is learnt, nothing to search
        assert detector.detect(COFFEE, "lobby", i * FPS_STEP_S) == []
    assert detector.last is not None and detector.last.skipped
    calls = counting.calls
    faces = detector.detect(with_face(), "lobby", 5 * FPS_STEP_S)
    report = detector.last
    assert report is not None
    assert report.full_reason is None, report
    assert 0.0 < report.searched < 1.0 and report.moved > 0.0
    assert counting.calls > calls
    assert len(faces) == 1 and centre_inside(faces[0], pasted_face_area()), faces


def test_a_still_face_is_kept_and_confirmed_around_it_only_now_and_then() -> None:
    """After the face is found, a still scene keeps its box without a detector run on most frames.

    The face is confirmed by a search of its neighbourhood only (< 0.3 of the frame) every
    ``still_recheck_s``; what differs from the learnt background (the face itself) is searched
    again every ``foreground_recheck_s``.
    """
    settings = MotionSettings()
    detector = gated()
    for i in range(5):
        detector.detect(COFFEE, "lobby", i * FPS_STEP_S)
    face = with_face()
    detector.detect(face, "lobby", 5 * FPS_STEP_S)
    reports = []
    frames = 30  # 3 s of a still scene, inside full_search_s (5 s): no safety-net search
    for i in range(6, 6 + frames):
        found = detector.detect(face, "lobby", i * FPS_STEP_S)
        assert len(found) == 1 and centre_inside(found[0], pasted_face_area()), (i, found)
        assert detector.last is not None
        reports.append(detector.last)
    assert [r.full_reason for r in reports] == [None] * frames
    searched = [round(r.searched, 2) for r in reports]
    confirmations = frames * FPS_STEP_S / settings.still_recheck_s
    rechecks = frames * FPS_STEP_S / settings.foreground_recheck_s
    runs = [s for s in searched if s > 0]
    assert confirmations - 1 <= len(runs) <= confirmations + rechecks + 1, searched
    assert sum(1 for s in runs if s >= 0.3) <= rechecks, searched
    assert sum(1 for r in reports if r.skipped) >= frames - len(runs), searched


class ShrunkSearchMisses(CountingDetector):
    """The real detector, except that the follow-up search at the face's own scale (on a shrunk
    copy) finds nothing, as happens to a face partly hidden by someone walking past."""

    def detect_near(self, gray: UInt8Array, side: int) -> list[Box]:
        self.calls += 1
        return []


def test_a_face_the_shrunk_search_misses_is_looked_for_again_at_full_resolution() -> None:
    """A still face is confirmed every ``still_recheck_s``; when the search at its own scale
    misses it, a face found within the last two frames is looked for once more around it at full
    resolution
    instead of disappearing until a background recheck finds it again."""
    detector = gated(ShrunkSearchMisses())
    for i in range(5):
        detector.detect(COFFEE, "lobby", i * FPS_STEP_S)
    face = with_face()
    for i in range(5, 25):  # 2 s: four confirmations
        found = detector.detect(face, "lobby", i * FPS_STEP_S)
        assert len(found) == 1 and centre_inside(found[0], pasted_face_area()), (i, found)
        assert detector.last is not None and detector.last.full_reason is None, (i, detector.last)


def test_a_kept_face_that_leaves_is_not_reported() -> None:
    """Leaving changes the pixels the face covered: the next frame searches there and finds nobody."""
    detector = gated()
    for i in range(5):
        detector.detect(COFFEE, "lobby", i * FPS_STEP_S)
    face = with_face()
    for i in range(5, 9):
        assert len(detector.detect(face, "lobby", i * FPS_STEP_S)) == 1
    assert detector.last is not None and detector.last.searched == 0.0  # kept, not searched
    assert detector.detect(COFFEE, "lobby", 9 * FPS_STEP_S) == []
    assert detector.last is not None and detector.last.searched > 0.0


def test_gating_keeps_the_detector_off_a_still_scene_after_the_first_frame() -> None:
    counting = CountingDetector()
    detector = gated(counting)
    for i in range(40):  # 4 s, inside full_search_s
        detector.detect(COFFEE, "cam", i * FPS_STEP_S)
        assert counting.calls == 1, f"frame {i}: the detector ran {counting.calls} times"
    # Without gating, the same frames each cost a whole-frame search.
    every = CountingDetector()
    ungated = make_camera_detector(DetectorSettings(motion=MotionSettings(enabled=False)), base=every)
    for i in range(5):
        ungated.detect(COFFEE, "cam", i * FPS_STEP_S)
    assert every.calls == 5


def test_the_whole_frame_is_still_searched_every_full_search_s() -> None:
    counting = CountingDetector()
    detector = gated(counting)
    settings = detector.motion_cfg
    reasons = []
    for i in range(61):  # 6 s of a still scene
        detector.detect(COFFEE, "cam", i * FPS_STEP_S)
        assert detector.last is not None
        reasons.append(detector.last.full_reason)
    at = round(settings.full_search_s / FPS_STEP_S)
    assert reasons[0] == "first" and reasons[at] == "interval"
    assert [r for i, r in enumerate(reasons) if i not in (0, at)] == [None] * 59
    assert counting.calls == 2


def test_a_frame_no_wider_than_the_motion_copy_is_searched_whole_on_every_frame() -> None:
    # A 128 x 96 camera (a thumbnail stream): gating would cost about a whole-frame search, and
    # Haar's flicker on faces this small is only caught by looking on every frame.
    small = np.ascontiguousarray(cv2.resize(with_face(), (128, 96), interpolation=cv2.INTER_AREA))
    counting = CountingDetector()
    detector = gated(counting)
    for i in range(6):
        detector.detect(small, "thumb", i * FPS_STEP_S)
        assert detector.last is not None and detector.last.searched == 1.0, (i, detector.last)
        assert detector.last.full_reason == ("first" if i == 0 else "small_frame"), (i, detector.last)
    # The same still view at full size is not searched again between safety nets.
    large = gated()
    for i in range(6):
        large.detect(with_face(), "big", i * FPS_STEP_S)
    assert large.last is not None and large.last.full_reason is None and large.last.searched < 1.0


def test_cameras_started_together_run_their_safety_net_searches_on_different_frames() -> None:
    # Eight cameras starting at once would search their whole frames together every full_search_s:
    # a burst that all their frames queue behind. Each camera keeps its own phase.
    settings = DetectorSettings()  # full_search_s 1 s, foreground_recheck_s 1 s
    detector = make_camera_detector(settings, base=CountingDetector())
    frame = with_face()
    interval_frames: dict[str, list[int]] = {"cam-a": [], "cam-b": []}
    for i in range(40):  # 4 s at 10 fps
        for camera, frames in interval_frames.items():
            detector.detect(frame, camera, i * FPS_STEP_S)
            assert detector.last is not None
            if detector.last.full_reason == "interval":
                frames.append(i)
    a, b = interval_frames["cam-a"], interval_frames["cam-b"]
    assert len(a) >= 3 and len(b) >= 3, interval_frames
    assert not set(a) & set(b), interval_frames
    for frames in (a, b):  # still every full_search_s
        assert all(later - earlier == 10 for earlier, later in itertools.pairwise(frames)), interval_frames


def test_a_worker_that_is_behind_runs_the_safety_net_less_often_and_says_so() -> None:
    # Frames that reach detection behind_s late or later: the whole-frame safety net (a large
    # share of a busy camera's detector time) waits behind_search_s, not full_search_s.
    settings = DetectorSettings()  # full_search_s 1 s, behind_s 0.4 s, behind_search_s 3 s
    motion = settings.motion
    assert motion.behind_search_s > motion.full_search_s > 0 < motion.behind_s
    frame = with_face()

    def safety_nets(lag_s: float) -> tuple[list[int], list[int]]:
        detector = make_camera_detector(settings, base=CountingDetector())
        nets, relieved = [], []
        for i in range(91):  # 9 s at 10 fps
            detector.detect(frame, "cam", i * FPS_STEP_S, lag_s=lag_s)
            assert detector.last is not None
            if detector.last.full_reason == "interval":
                nets.append(i)
            if detector.last.relieved:
                relieved.append(i)
        return nets, relieved

    on_time, relieved = safety_nets(lag_s=0.1)
    assert not relieved and len(on_time) >= 8, (on_time, relieved)
    assert all(b - a == 10 for a, b in itertools.pairwise(on_time)), on_time
    late, relieved = safety_nets(lag_s=motion.behind_s)
    assert len(late) >= 2 and all(b - a == 30 for a, b in itertools.pairwise(late)), late
    # Every frame from full_search_s to behind_search_s after a whole-frame search (the
    # first frame's, then each safety net's) had the safety net due and put off.
    assert relieved == [n + k for n in [0, *late] for k in range(10, 30) if n + k <= 90], (late, relieved)


def test_a_worker_that_is_behind_searches_what_differs_from_the_background_less_often() -> None:
    # Something left standing still (here a textured patch, no face) differs from the learnt
    # background: it is searched every foreground_recheck_s, or every behind_search_s when late.
    settings = DetectorSettings(motion=MotionSettings(full_search_s=0))  # no safety net here
    motion = settings.motion
    frame = COFFEE.copy()
    frame[150:210, 100:160] = np.random.default_rng(7).integers(0, 256, (60, 60), dtype=np.uint8)

    def searches(lag_s: float) -> list[int]:
        detector = make_camera_detector(settings, base=CountingDetector())
        for i in range(5):
            detector.detect(COFFEE, "hall", i * FPS_STEP_S, lag_s=lag_s)
        done = []
        for i in range(5, 96):  # the patch appears, then stays for 9 s
            detector.detect(frame, "hall", i * FPS_STEP_S, lag_s=lag_s)
            assert detector.last is not None and detector.last.full_reason is None, (i, detector.last)
            if detector.last.searched > 0:
                done.append(i)
        return done

    on_time, late = searches(0.0), searches(motion.behind_s)
    assert on_time[0] == late[0] == 5, (on_time, late)  # the change itself, at once either way
    gap, late_gap = round(motion.foreground_recheck_s / FPS_STEP_S), round(motion.behind_search_s / FPS_STEP_S)
    assert all(b - a == gap for a, b in itertools.pairwise(on_time[1:])) and len(on_time) >= 8, on_time
    assert all(b - a == late_gap for a, b in itertools.pairwise(late[1:])) and len(late) >= 3, late

"""Face detection behind a small interface, and the crop geometry shared by services and CLI.

``haar`` (OpenCV's frontal-face cascade from the wheel) is the default; ``dnn`` runs an
OpenCV DNN SSD face detector from model files the user supplies (e.g. a res10 Caffe model).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, cast

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.imaging import FACE_SIZE, UInt8Array, to_gray
from shared.motion import Motion, MotionAnalyzer, MotionSettings, area, grow, merge
from shared.schema import Box


class DetectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["haar", "dnn"] = Field("haar", description="detector implementation")
    cascade: Path | None = Field(None, description="Haar XML; default: frontal-face cascade from the OpenCV wheel")
    scale_factor: float = Field(1.1, gt=1.0, le=2.0, description="Haar image-pyramid step")
    min_neighbors: int = Field(5, ge=0, le=50, description="Haar overlapping hits needed to accept a face")
    min_size: int = Field(40, ge=8, le=2000, description="smallest face side in pixels of the full frame")
    downscale_width: int = Field(0, ge=0, le=8192,
                                 description="run detection on a copy this wide (0 = full frame); crops stay full-size")
    dnn_model: Path | None = Field(None, description="DNN weights (.caffemodel, .onnx, .pb)")
    dnn_config: Path | None = Field(None, description="DNN config (.prototxt) where the format needs one")
    dnn_confidence: float = Field(0.6, gt=0, lt=1, description="DNN score threshold")
    margin: float = Field(0.1, ge=0.0, le=1.0, description="crop margin as a fraction of the face side")
    keyframe_interval: int = Field(0, ge=0, le=1000,
                                   description="search the whole frame every N frames of a camera and only around "
                                               "known faces in between (0 = whole frame always)")
    roi_expand: float = Field(0.6, ge=0.1, le=3.0, description="search region around a known face, in face sides")
    follow_neighbors_relief: int = Field(2, ge=0, le=50,
                                         description="a known face is confirmed with this many fewer overlapping "
                                                     "hits than min_neighbors (it was already found there)")
    motion: MotionSettings = Field(default_factory=MotionSettings,  # type: ignore[arg-type]
                                   description="motion gating: where (and how often) the whole frame is searched")

    @model_validator(mode="after")
    def _dnn_needs_model(self) -> DetectorSettings:
        if self.kind == "dnn" and self.dnn_model is None:
            raise ValueError("kind 'dnn' needs dnn_model (a face-detector model file)")
        return self


class Detector(Protocol):
    def detect(self, gray: UInt8Array) -> list[Box]:
        """Faces in a grey frame, in its pixel coordinates."""


def default_cascade() -> Path:
    """The frontal-face cascade inside the OpenCV wheel."""
    return Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]


class HaarDetector:
    def __init__(self, cfg: DetectorSettings) -> None:
        path = cfg.cascade or default_cascade()
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ValueError(f"cannot load Haar cascade {path}")
        self.cfg = cfg

    def detect(self, gray: UInt8Array) -> list[Box]:
        scale = _downscale(gray, self.cfg.downscale_width)
        small = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        min_side = max(8, round(self.cfg.min_size * scale))
        found = self._cascade.detectMultiScale(small, scaleFactor=self.cfg.scale_factor,
                                               minNeighbors=self.cfg.min_neighbors, minSize=(min_side, min_side))
        return [_scaled_box(tuple(int(v) for v in f), 1.0 / scale) for f in found]

    def detect_near(self, gray: UInt8Array, side: int) -> list[Box]:
        """Faces of about ``side`` pixels (0.75x to 1.35x) in a region around a known face.

        The region is shrunk so that such a face is ~``FOLLOW_SIDE`` pixels and only those
        scales are searched: a handful of pyramid levels of a small image instead of all of them.
        """
        scale = min(1.0, FOLLOW_SIDE / max(side, 1))
        small = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        lo = max(HAAR_WINDOW, int(side * scale * 0.75))
        hi = max(lo + 1, int(side * scale * 1.35) + 1)
        # A face known to be here needs less evidence than one found anywhere in the frame.
        neighbors = max(1, self.cfg.min_neighbors - self.cfg.follow_neighbors_relief)
        found = self._cascade.detectMultiScale(small, scaleFactor=self.cfg.scale_factor,
                                               minNeighbors=neighbors, minSize=(lo, lo), maxSize=(hi, hi))
        return [_scaled_box(tuple(int(v) for v in f), 1.0 / scale) for f in found]


# A known face the shrunk search misses is looked for at full resolution on this many frames
# after it was last found (a face too faint for one frame often is for the next as well).
FULL_RETRY_FRAMES = 2

# The frontal-face cascade's window is 24 px; a followed face is searched at about twice that.
HAAR_WINDOW = 24
FOLLOW_SIDE = 48


class DnnDetector:
    """OpenCV DNN SSD-style face detector ((1,1,N,7) output, normalised boxes)."""

    def __init__(self, cfg: DetectorSettings) -> None:
        assert cfg.dnn_model is not None
        if not cfg.dnn_model.exists():
            raise ValueError(f"DNN model file {cfg.dnn_model} not found")
        self._net = cv2.dnn.readNet(str(cfg.dnn_model), str(cfg.dnn_config) if cfg.dnn_config else "")
        self.cfg = cfg

    def detect(self, gray: UInt8Array) -> list[Box]:
        h, w = gray.shape[:2]
        bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        blob = cv2.dnn.blobFromImage(cv2.resize(bgr, (300, 300)), 1.0, (300, 300), (104.0, 177.0, 123.0))
        self._net.setInput(blob)
        out = self._net.forward().reshape(-1, 7)
        boxes = []
        for row in out:
            if float(row[2]) < self.cfg.dnn_confidence:
                continue
            x1, y1, x2, y2 = (np.clip(row[3:7], 0, 1) * np.array([w, h, w, h])).astype(int)
            if x2 - x1 >= self.cfg.min_size // 2 and y2 - y1 >= self.cfg.min_size // 2:
                boxes.append(Box(int(x1), int(y1), int(x2 - x1), int(y2 - y1)))
        return boxes


@dataclass
class _CameraState:
    boxes: list[Box]
    since_key: int


class FollowingDetector:
    """Whole-frame search on keyframes; in between, search only around the faces already known.

    A face's neighbourhood is a few percent of a frame, so the frames between keyframes cost
    little. New faces are found at the next keyframe (at most ``keyframe_interval`` frames later),
    and a frame where a known face is lost becomes a keyframe at once.
    """

    def __init__(self, base: Detector, cfg: DetectorSettings) -> None:
        self.base = base
        self.cfg = cfg
        self._cameras: dict[str, _CameraState] = {}
        self.keyframes = 0
        self.followed = 0

    last: GateReport | None = None

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None) -> list[Box]:
        state = self._cameras.get(camera)
        if state is None or not state.boxes or state.since_key + 1 >= self.cfg.keyframe_interval:
            return self._keyframe(gray, camera)
        found = self._around(gray, state.boxes)
        if len(found) < len(state.boxes):
            return self._keyframe(gray, camera)
        state.boxes, state.since_key = found, state.since_key + 1
        self.followed += 1
        return found

    def forget(self, camera: str) -> None:
        self._cameras.pop(camera, None)

    def _keyframe(self, gray: UInt8Array, camera: str) -> list[Box]:
        boxes = self.base.detect(gray)
        self._cameras[camera] = _CameraState(boxes, 0)
        self.keyframes += 1
        return boxes

    def _around(self, gray: UInt8Array, known: list[Box]) -> list[Box]:
        found: list[Box] = []
        for box in known:
            moved, _ = search_around(self.base, gray, box, self.cfg.roi_expand)
            if moved is not None and all(_overlap(moved, other) < 0.5 for other in found):
                found.append(moved)
        return found


def search_around(base: Detector, gray: UInt8Array, box: Box, expand: float,
                  at_scale: bool = True) -> tuple[Box | None, int]:
    """The face near a known one (at about its scale where the detector can and ``at_scale``),
    and the pixels searched."""
    h, w = gray.shape[:2]
    pad = int(max(box.w, box.h) * expand)
    x0, y0 = max(0, box.x - pad), max(0, box.y - pad)
    x1, y1 = min(w, box.x + box.w + pad), min(h, box.y + box.h + pad)
    if x1 <= x0 or y1 <= y0:
        return None, 0
    roi = np.ascontiguousarray(gray[y0:y1, x0:x1])
    near = getattr(base, "detect_near", None) if at_scale else None
    hits = near(roi, max(box.w, box.h)) if near is not None else base.detect(roi)
    searched = (x1 - x0) * (y1 - y0)
    if not hits:
        return None, searched
    # The hit nearest the known face: another face passing close by must not take its place.
    cx, cy = 2 * box.x + box.w - 2 * x0, 2 * box.y + box.h - 2 * y0
    best = min(hits, key=lambda b: (2 * b.x + b.w - cx) ** 2 + (2 * b.y + b.h - cy) ** 2)
    return Box(best.x + x0, best.y + y0, best.w, best.h), searched


def _overlap(a: Box, b: Box) -> float:
    x1, y1 = max(a.x, b.x), max(a.y, b.y)
    x2, y2 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / max(1, min(a.w * a.h, b.w * b.h))


def _explained(change: Box, found: list[Box], lost: list[Box], cfg: DetectorSettings) -> bool:
    """A change mostly inside the zone of a face found on this frame (around it, and its body
    below it) is that person moving; one touching a face that was just lost is not (whoever it
    was may have moved on: search there)."""
    if any(_overlap(change, _around(k, cfg.roi_expand)) > 0 for k in lost):
        return False
    inside = 0
    for face in found:
        zone = _around(face, EXPLAINED_MARGIN)
        zone = Box(zone.x, zone.y, zone.w, 1 << 30)  # the body is below the face
        inside = max(inside, _intersection(change, zone))
    return inside >= EXPLAINED_SHARE * change.w * change.h


# A change counts as a known person moving when at least this share of it lies in their zone:
# the face grown by this many face sides, and everything below it.
EXPLAINED_SHARE = 0.7
EXPLAINED_MARGIN = 0.45


def _around(box: Box, expand: float) -> Box:
    pad = int(max(box.w, box.h) * expand)
    return Box(box.x - pad, box.y - pad, box.w + 2 * pad, box.h + 2 * pad)


def _intersection(a: Box, b: Box) -> int:
    x1, y1 = max(a.x, b.x), max(a.y, b.y)
    x2, y2 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    return max(0, x2 - x1) * max(0, y2 - y1)


@dataclass
class _Known:
    box: Box
    seen: float  # when it was last found (or kept, being still)
    confirmed: float  # when the detector last found it
    followed: Box | None = None  # where it is on this frame (found by following, or kept)
    misses: int = 0  # frames since it was last found


@dataclass
class _GateState:
    motion: MotionAnalyzer
    known: list[_Known] = field(default_factory=list)
    last_full: float = float("-inf")
    last_foreground: float = float("-inf")
    last_frame: float = float("-inf")
    kept: dict[Box, float] = field(default_factory=dict)  # still faces kept this frame: when last confirmed


@dataclass(frozen=True)
class GateReport:
    """What the last frame cost: why the whole frame was searched (if it was) and how much was searched."""

    full_reason: str | None  # first | scene_change | camera_motion | large_motion | interval
    searched: float  # fraction of the frame's pixels run through the detector
    moved: float  # fraction of the frame that changed
    skipped: bool  # no detector run at all: nothing moved, and the faces known (if any) were still


class GatedDetector:
    """Faces searched where the scene moves and around the faces already known, per camera.

    Each frame: motion of the camera's view (:class:`~shared.motion.MotionAnalyzer`); the base
    detector runs at full resolution inside what changed (grown by a margin,
    merged, clipped) and around known faces at their scale. The whole frame is searched on a
    camera's first frame, on a scene cut, at most every ``camera_search_s`` while the camera
    moves (known faces are followed in between), when the regions would cover most of the
    frame anyway, and every ``full_search_s`` as a safety net. What differs from the background
    without changing (people standing still) is searched every ``foreground_recheck_s``. A
    known face with no change over it since the previous frame keeps its box, confirmed by the
    detector every ``still_recheck_s`` (as video analytics do for stationary objects); a change
    that a face found on this frame explains (the person's own head and body moving) is not
    searched again. A still scene costs one small resize and two differences.
    """

    def __init__(self, base: Detector, cfg: DetectorSettings) -> None:
        self.base = base
        self.cfg = cfg
        self.motion_cfg = cfg.motion
        self._cameras: dict[str, _GateState] = {}
        self.last: GateReport | None = GateReport(None, 0.0, 0.0, False)

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None) -> list[Box]:
        now = time.monotonic() if ts is None else ts
        state = self._cameras.get(camera)
        if state is None:
            state = self._cameras[camera] = _GateState(MotionAnalyzer(self.motion_cfg))
        motion = state.motion.update(gray)
        if motion.kind == "camera":  # known faces move with the view
            dx, dy = round(motion.shift[0]), round(motion.shift[1])
            for known in state.known:
                known.box = Box(known.box.x + dx, known.box.y + dy, known.box.w, known.box.h)
        reason = self._full_reason(state, motion, now)
        h, w = gray.shape[:2]
        searched = 0
        if reason is None:
            boxes, searched = self._follow(gray, state, motion, now)
            regions = self._regions(state, motion, now, w, h)
            limit = self.motion_cfg.max_region_fraction * w * h
            if area(regions) > limit:
                # Most of the view changes (a zoom, a crowd): what touches a known face is left
                # to following, and if the rest is still most of the frame, the whole frame is
                # searched, at most every camera_search_s (as for a moving camera).
                faces = [k.box for k in state.known]
                regions = [r for r in regions if all(_overlap(r, f) == 0 for f in faces)]
            if area(regions) <= limit:
                searched += self._search_regions(gray, regions, boxes)
            elif now - state.last_full >= self.motion_cfg.camera_search_s:
                reason = "large_motion"
        if reason is not None:
            boxes, searched = self.base.detect(gray), w * h
            state.last_full = state.last_foreground = now
            state.kept = {}  # every face found now is confirmed now
        self._remember(state, boxes, now, drop_lost=reason == "scene_change")
        state.last_frame = now
        self.last = GateReport(reason, min(1.0, searched / max(1, w * h)), motion.fraction,
                               skipped=reason is None and searched == 0)
        return boxes

    def forget(self, camera: str) -> None:
        """Drop a camera's state (another worker took it over, or it was removed)."""
        self._cameras.pop(camera, None)

    def _full_reason(self, state: _GateState, motion: Motion, now: float) -> str | None:
        cfg = self.motion_cfg
        if motion.kind == "first":
            return "first"
        if motion.kind == "cut":
            return "scene_change"
        if motion.kind == "camera" and now - state.last_full >= cfg.camera_search_s:
            return "camera_motion"
        if cfg.full_search_s and now - state.last_full >= cfg.full_search_s:
            return "interval"
        return None

    def _regions(self, state: _GateState, motion: Motion, now: float, w: int, h: int) -> list[Box]:
        """What changed (and now and then what differs from the background), less what a face
        found on this frame explains (that person's own head and body), grown and merged."""
        side = self.cfg.min_size
        pad = round(side * self.motion_cfg.region_margin)
        changes = motion.boxes
        if now - state.last_foreground >= self.motion_cfg.foreground_recheck_s:
            state.last_foreground = now
            changes = changes + motion.foreground
        found = [k.box for k in state.known if k.followed is not None]
        lost = [k.box for k in state.known if k.followed is None]
        return merge([self._grow(b, pad, w, h) for b in changes if not _explained(b, found, lost, self.cfg)])

    def _grow(self, box: Box, pad: int, w: int, h: int) -> Box:
        # A large change may be part of a larger face (a new face where another was differs
        # only in places): the margin grows with the change's narrow side (a tall change is a
        # walking body, not a taller face).
        extra = round(min(box.w, box.h) * 0.25)
        return grow(box, pad + extra, round(self.cfg.min_size * 1.5), w, h)

    def _follow(self, gray: UInt8Array, state: _GateState, motion: Motion, now: float) -> tuple[list[Box], int]:
        """The known faces on this frame: kept where still, else searched for around where they were."""
        found: list[Box] = []
        searched = 0
        for known in state.known:
            if self._still(known, state, motion, now):
                # Nothing changed around it since the previous frame, where it was: it is still
                # there (leaving or turning away would change those pixels). Re-run now and then.
                known.followed = known.box
                state.kept[known.box] = known.confirmed
                found.append(known.box)
                continue
            hit, pixels = search_around(self.base, gray, known.box, self.cfg.roi_expand)
            searched += pixels
            if hit is None and known.misses < FULL_RETRY_FRAMES:
                # Found a moment ago: a face partly hidden by someone passing, or turning, can be
                # too faint for the shrunk search; look once more at full resolution.
                hit, pixels = search_around(self.base, gray, known.box, self.cfg.roi_expand, at_scale=False)
                searched += pixels
            if hit is not None and all(_overlap(hit, other) < 0.5 for other in found):
                found.append(hit)
                known.followed = hit
        return found, searched

    def _search_regions(self, gray: UInt8Array, regions: list[Box], found: list[Box]) -> int:
        """New faces inside the regions, added to ``found``; returns the pixels searched."""
        searched = 0
        for region in regions:
            roi = np.ascontiguousarray(gray[region.y:region.y + region.h, region.x:region.x + region.w])
            searched += region.w * region.h
            for hit in self.base.detect(roi):
                moved = Box(hit.x + region.x, hit.y + region.y, hit.w, hit.h)
                if all(_overlap(moved, other) < 0.5 for other in found):
                    found.append(moved)
        return searched

    def _still(self, known: _Known, state: _GateState, motion: Motion, now: float) -> bool:
        """Found on the previous frame, confirmed recently, and nothing changed over it since."""
        if known.seen < state.last_frame or motion.kind != "local":
            return False
        if now - known.confirmed >= self.motion_cfg.still_recheck_s:
            return False
        around = grow(known.box, round(max(known.box.w, known.box.h) * 0.25), 1, 1 << 30, 1 << 30)
        return all(_overlap(around, b) == 0 for b in motion.boxes)

    def _remember(self, state: _GateState, boxes: list[Box], now: float, drop_lost: bool) -> None:
        """Known faces: those found now, and those lost less than ``forget_after_s`` ago (a face
        hidden for a moment by someone walking past comes back where it was)."""
        lost = [] if drop_lost else [
            k for k in state.known
            if k.followed is None and now - k.seen < self.motion_cfg.forget_after_s
            and all(_overlap(k.box, b) < 0.3 for b in boxes if b not in self._followed_boxes(state))]
        for k in lost:
            k.misses += 1
        state.known = [_Known(b, now, state.kept.get(b, now)) for b in boxes] + lost
        state.kept = {}

    @staticmethod
    def _followed_boxes(state: _GateState) -> list[Box]:
        return [k.followed for k in state.known if k.followed is not None]


def make_detector(cfg: DetectorSettings) -> Detector:
    return HaarDetector(cfg) if cfg.kind == "haar" else DnnDetector(cfg)


class CameraDetector(Protocol):
    """Finds faces in a camera's frames given in capture order (state per camera)."""

    last: GateReport | None  # what the last frame cost, where the detector knows

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None) -> list[Box]:
        """Faces in one grey frame of ``camera`` captured at ``ts`` (seconds)."""

    def forget(self, camera: str) -> None:
        """Drop the camera's state."""


class EveryFrame:
    """The base detector over every whole frame (no per-camera state)."""

    last: GateReport | None = None

    def __init__(self, base: Detector) -> None:
        self.base = base

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None) -> list[Box]:
        return self.base.detect(gray)

    def forget(self, camera: str) -> None:
        return None


def make_camera_detector(cfg: DetectorSettings, base: Detector | None = None) -> CameraDetector:
    """The default path (motion-gated), or following between keyframes, or every whole frame."""
    base = base or make_detector(cfg)
    if cfg.motion.enabled:
        return GatedDetector(base, cfg)
    if cfg.keyframe_interval:
        return FollowingDetector(base, cfg)
    return EveryFrame(base)


def _downscale(gray: UInt8Array, width: int) -> float:
    if width <= 0 or gray.shape[1] <= width:
        return 1.0
    return width / gray.shape[1]


def _scaled_box(xywh: tuple[int, ...], factor: float) -> Box:
    x, y, w, h = xywh
    return Box(round(x * factor), round(y * factor), round(w * factor), round(h * factor))


@dataclass(frozen=True)
class CropRegion:
    """Square region (may reach outside the frame; the outside is filled by edge replication)."""

    x0: int
    y0: int
    side: int


def crop_region(box: Box, margin: float) -> CropRegion:
    """Square around the box's centre, side = max(w, h) * (1 + 2 * margin)."""
    side = max(1, round(max(box.w, box.h) * (1.0 + 2.0 * margin)))
    cx2 = 2 * box.x + box.w  # twice the centre: integer arithmetic, no drift
    cy2 = 2 * box.y + box.h
    return CropRegion(x0=(cx2 - side) // 2, y0=(cy2 - side) // 2, side=side)


def crop_face(gray: UInt8Array, box: Box, margin: float, size: int = FACE_SIZE) -> UInt8Array:
    """A size x size grey crop of the face, square, with margin, edge-padded at frame borders."""
    region = crop_region(box, margin)
    h, w = gray.shape[:2]
    x1, y1 = region.x0 + region.side, region.y0 + region.side
    pad_l, pad_t = max(0, -region.x0), max(0, -region.y0)
    pad_r, pad_b = max(0, x1 - w), max(0, y1 - h)
    inner = gray[max(0, region.y0):min(h, y1), max(0, region.x0):min(w, x1)]
    if pad_l or pad_t or pad_r or pad_b:
        inner = cast(UInt8Array, cv2.copyMakeBorder(inner, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE))
    interp = cv2.INTER_AREA if region.side > size else cv2.INTER_LINEAR
    return cast(UInt8Array, cv2.resize(inner, (size, size), interpolation=interp))


@dataclass(frozen=True)
class DetectedFace:
    box: Box
    crop: UInt8Array  # (size, size) grey


def detect_and_crop(detector: Detector, image: UInt8Array, margin: float,
                    size: int = FACE_SIZE) -> list[DetectedFace]:
    """Detect faces in a BGR or grey image and crop each, largest face first."""
    gray = to_gray(image)
    return crop_faces(gray, detector.detect(gray), margin, size)


def crop_faces(gray: UInt8Array, boxes: list[Box], margin: float, size: int = FACE_SIZE) -> list[DetectedFace]:
    """Each face cropped, largest first."""
    ordered = sorted(boxes, key=lambda b: (-b.w * b.h, b.x, b.y))
    return [DetectedFace(b, crop_face(gray, b, margin, size)) for b in ordered]

"""Face detection behind a small interface, and the crop geometry shared by services and CLI.

``haar`` (OpenCV's frontal-face cascade from the wheel) is the default; ``dnn`` runs an
OpenCV DNN SSD face detector from model files the user supplies (e.g. a res10 Caffe model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, cast

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.imaging import FACE_SIZE, UInt8Array, to_gray
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
        found = self._cascade.detectMultiScale(small, scaleFactor=self.cfg.scale_factor,
                                               minNeighbors=self.cfg.min_neighbors, minSize=(lo, lo),
                                               maxSize=(hi, hi))
        return [_scaled_box(tuple(int(v) for v in f), 1.0 / scale) for f in found]


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

    def detect(self, gray: UInt8Array, camera: str = "") -> list[Box]:
        state = self._cameras.get(camera)
        if state is None or not state.boxes or state.since_key + 1 >= self.cfg.keyframe_interval:
            return self._keyframe(gray, camera)
        found = self._around(gray, state.boxes)
        if len(found) < len(state.boxes):
            return self._keyframe(gray, camera)
        state.boxes, state.since_key = found, state.since_key + 1
        self.followed += 1
        return found

    def bound(self, camera: str) -> Detector:
        """A :class:`Detector` for one camera's frames."""
        return _BoundFollower(self, camera)

    def _keyframe(self, gray: UInt8Array, camera: str) -> list[Box]:
        boxes = self.base.detect(gray)
        self._cameras[camera] = _CameraState(boxes, 0)
        self.keyframes += 1
        return boxes

    def _around(self, gray: UInt8Array, known: list[Box]) -> list[Box]:
        h, w = gray.shape[:2]
        found: list[Box] = []
        for box in known:
            pad = int(max(box.w, box.h) * self.cfg.roi_expand)
            x0, y0 = max(0, box.x - pad), max(0, box.y - pad)
            x1, y1 = min(w, box.x + box.w + pad), min(h, box.y + box.h + pad)
            roi = np.ascontiguousarray(gray[y0:y1, x0:x1])
            near = getattr(self.base, "detect_near", None)
            hits = near(roi, max(box.w, box.h)) if near is not None else self.base.detect(roi)
            if hits:
                best = max(hits, key=lambda b: b.w * b.h)
                moved = Box(best.x + x0, best.y + y0, best.w, best.h)
                if all(_overlap(moved, other) < 0.5 for other in found):
                    found.append(moved)
        return found


@dataclass(frozen=True)
class _BoundFollower:
    follower: FollowingDetector
    camera: str

    def detect(self, gray: UInt8Array) -> list[Box]:
        return self.follower.detect(gray, self.camera)


def _overlap(a: Box, b: Box) -> float:
    x1, y1 = max(a.x, b.x), max(a.y, b.y)
    x2, y2 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / max(1, min(a.w * a.h, b.w * b.h))


def make_detector(cfg: DetectorSettings) -> Detector:
    return HaarDetector(cfg) if cfg.kind == "haar" else DnnDetector(cfg)


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
    boxes = sorted(detector.detect(gray), key=lambda b: (-b.w * b.h, b.x, b.y))
    return [DetectedFace(b, crop_face(gray, b, margin, size)) for b in boxes]

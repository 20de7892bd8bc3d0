"""Detector backends behind one small interface, and what every camera detector shares.

``haar`` (OpenCV's frontal-face cascade from the wheel) is the default; ``dnn`` runs an
OpenCV DNN SSD face detector from model files the user supplies (e.g. a res10 Caffe model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.imaging import UInt8Array
from shared.motion import MotionSettings
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
    follow_neighbors_relief: int = Field(0, ge=0, le=50,
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
        # Never smaller than whole-frame search would accept: a box it could not have found is
        # not a face this camera reports.
        lo = max(HAAR_WINDOW, int(side * scale * 0.75), round(self.cfg.min_size * scale))
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


def overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area (1.0 when one holds the other)."""
    x1, y1 = max(a.x, b.x), max(a.y, b.y)
    x2, y2 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / max(1, min(a.w * a.h, b.w * b.h))


@dataclass(frozen=True)
class GateReport:
    """What the last frame cost: why the whole frame was searched (if it was) and how much was searched."""

    full_reason: str | None  # first | small_frame | scene_change | camera_motion | large_motion | crowded
    # | interval
    searched: float  # fraction of the frame's pixels run through the detector
    moved: float  # fraction of the frame that changed
    skipped: bool  # no detector run at all: nothing moved, and the faces known (if any) were still
    relieved: bool = False  # the safety net was due but put off: detect is behind (motion.behind_s)


def make_detector(cfg: DetectorSettings) -> Detector:
    return HaarDetector(cfg) if cfg.kind == "haar" else DnnDetector(cfg)


class CameraDetector(Protocol):
    """Finds faces in a camera's frames given in capture order (state per camera)."""

    last: GateReport | None  # what the last frame cost, where the detector knows

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None, lag_s: float = 0.0) -> list[Box]:
        """Faces in one grey frame of ``camera`` captured at ``ts`` (seconds), ``lag_s`` seconds
        after its capture (how far the caller is behind; a detector may do less when it is)."""

    def forget(self, camera: str) -> None:
        """Drop the camera's state."""


class EveryFrame:
    """The base detector over every whole frame (no per-camera state)."""

    last: GateReport | None = None

    def __init__(self, base: Detector) -> None:
        self.base = base

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None, lag_s: float = 0.0) -> list[Box]:
        return self.base.detect(gray)

    def forget(self, camera: str) -> None:
        return None


def _downscale(gray: UInt8Array, width: int) -> float:
    if width <= 0 or gray.shape[1] <= width:
        return 1.0
    return width / gray.shape[1]


def _scaled_box(xywh: tuple[int, ...], factor: float) -> Box:
    x, y, w, h = xywh
    return Box(round(x * factor), round(y * factor), round(w * factor), round(h * factor))



"""Per-camera motion analysis on a small grey copy of each frame.

Two differences on a copy ``width`` pixels wide, each frame scaled first to the previous one's
mean brightness (a light dimming or an auto-exposure step is not motion):

- against the previous frame: what *changes now* (a face walking in, a head turning). Its
  blobs are searched on every frame. When most of the frame changed at once it is a scene
  cut (or a light switched); when the whole view shifted (phase correlation, confirmed by the
  shifted frame matching), the camera moves. Both are *global*: regions mean nothing then.
- against a running background: what is *there but new* (a person who walked in and
  stopped). The background learns fast where nothing moves and slowly where something does,
  so a walker leaves no ghost and a person who sits down is absorbed after a while. These
  blobs are searched now and then (``foreground_recheck_s``): they catch a face the detector
  lost while its owner stood still.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.imaging import UInt8Array
from shared.schema import Box

FloatArray = np.ndarray

# Slow learning inside moving areas: alpha divided by this.
MOVING_SLOWDOWN = 20.0
DILATE_KERNEL = np.ones((3, 3), np.uint8)


class MotionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="search for faces only where the scene moves and around known faces "
                                            "(false: every frame searched whole, or per keyframe_interval)")
    width: int = Field(160, ge=32, le=1280, description="width of the grey copy motion is computed on, in pixels")
    threshold: int = Field(18, ge=1, le=255, description="grey-level change from the background that counts as motion")
    min_area: float = Field(0.0005, ge=0.0, le=0.5,
                            description="smallest motion blob kept, as a fraction of the frame's area")
    alpha: float = Field(0.08, gt=0.0, le=1.0, description="background learning rate per frame where nothing moves")
    lighting_compensation: bool = Field(True, description="scale each frame to the background's mean brightness "
                                                          "before comparing (lighting changes are not motion)")
    cut_fraction: float = Field(0.35, gt=0.0, le=1.0,
                                description="a change from the previous frame over this fraction of the frame is a "
                                            "scene cut (or a light switched): whole-frame search, background re-learnt")
    camera_shift: float = Field(1.5, gt=0.0, le=100.0,
                                description="a whole-frame shift of this many full-frame pixels between frames means "
                                            "the camera moves: regions are pointless, known faces are followed")
    region_margin: float = Field(0.5, ge=0.0, le=4.0,
                                 description="motion boxes grow by this many smallest-face sides on each side")
    max_region_fraction: float = Field(0.6, gt=0.0, le=1.0,
                                       description="when regions cover more of the frame than this, search it whole")
    full_search_s: float = Field(1.0, ge=0.0, le=3600.0,
                                 description="safety net: search the whole frame at least this often (0 = never)")
    behind_s: float = Field(0.4, ge=0.0, le=60.0,
                            description="a frame at least this old (capture to detection) means detect is behind: "
                                        "its periodic searches then wait behind_search_s (0 = never relieved)")
    behind_search_s: float = Field(3.0, ge=0.0, le=3600.0,
                                   description="while detect is behind, the whole-frame safety net and the search "
                                               "of what differs from the background run at most this often (fewer "
                                               "searches lose less than frames dropped as stale)")
    camera_search_s: float = Field(0.25, ge=0.0, le=60.0,
                                   description="while the camera moves, whole-frame search at most this often; "
                                               "known faces are followed in between")
    foreground_recheck_s: float = Field(1.0, ge=0.0, le=60.0,
                                        description="how often what differs from the background (people standing "
                                                    "still) is searched; what changes is searched every frame")
    still_recheck_s: float = Field(0.5, ge=0.0, le=60.0,
                                   description="a known face where nothing changed since the previous frame keeps its "
                                               "box without a detector run, confirmed by one at least this often "
                                               "(0 = every frame)")
    follow_confirm_s: float = Field(0.3, ge=0.0, le=60.0,
                                    description="a known face that moves is followed by its look between frames and "
                                                "confirmed by the detector around it at least this often")
    follow_min_score: float = Field(0.5, ge=-1.0, le=1.0,
                                    description="how closely (normalised cross-correlation) the face's look must "
                                                "match for it to be followed without a detector run")
    max_unconfirmed_s: float = Field(0.6, ge=0.0, le=60.0,
                                     description="a face the detector has not found for this long is no longer "
                                                 "reported (its look alone does not keep it longer)")
    forget_after_s: float = Field(2.0, ge=0.0, le=60.0,
                                  description="how long a known face that was not found is still looked for where "
                                              "it was last seen (someone walked past it)")


@dataclass(frozen=True)
class Motion:
    boxes: list[Box]  # what changed since the previous frame, full-frame pixels
    foreground: list[Box]  # what differs from the background, full-frame pixels
    fraction: float  # of the frame's area that changed since the previous frame
    kind: str = "local"  # local | first (no background yet) | cut | camera (the camera moves)
    shift: tuple[float, float] = (0.0, 0.0)  # how far the view moved, full-frame pixels (kind camera)

    @property
    def is_global(self) -> bool:
        return self.kind != "local"


class MotionAnalyzer:
    """One camera's background and the motion of each new frame against it."""

    def __init__(self, cfg: MotionSettings) -> None:
        self.cfg = cfg
        self._bg: FloatArray | None = None
        self._prev: FloatArray | None = None
        self._window: FloatArray | None = None
        self._shape: tuple[int, int] = (0, 0)

    def reset(self) -> None:
        self._bg = self._prev = None

    def update(self, gray: UInt8Array) -> Motion:
        h, w = gray.shape[:2]
        small = self._small(gray)
        bg, prev = self._bg, self._prev
        if bg is None or prev is None or self._shape != (h, w) or bg.shape != small.shape:
            self._bg, self._prev, self._shape = small, small.copy(), (h, w)
            self._window = cast(FloatArray, cv2.createHanningWindow((small.shape[1], small.shape[0]), cv2.CV_32F))
            return Motion([], [], 1.0, "first")
        if self.cfg.lighting_compensation:
            small = _match_brightness(small, prev)
        self._prev = small
        changed = self._mask(small, prev)
        fraction = float(cv2.countNonZero(changed)) / changed.size
        # A pan over a finely textured view changes most pixels too: a shift that explains the
        # change is the camera moving, not a cut.
        shift = self._camera_shift(small, prev, w / small.shape[1])
        if fraction > self.cfg.cut_fraction or shift is not None:
            self._bg = small.copy()  # a new view: learn it at once
            return Motion([], [], fraction, "cut" if shift is None else "camera", shift or (0.0, 0.0))
        foreground = self._mask(small, bg)
        self._learn(small, foreground)
        sx, sy = w / small.shape[1], h / small.shape[0]
        return Motion(self._boxes(changed, sx, sy), self._boxes(foreground, sx, sy), fraction)

    def _camera_shift(self, small: FloatArray, prev: FloatArray, scale: float) -> tuple[float, float] | None:
        """How far the whole view shifted since the previous frame (full-frame pixels), if it did."""
        # phaseCorrelate's own window argument is applied in place on these buffers: window copies.
        (dx, dy), response = cv2.phaseCorrelate(prev * self._window, small * self._window)
        # A real pan moves the view a little per frame; a "shift" of a tenth of the frame or more
        # is the correlation of unrelated content (something large appeared), not a camera.
        if response < 0.05 or not self.cfg.camera_shift <= np.hypot(dx, dy) * scale < 0.1 * small.shape[1] * scale:
            return None
        # A person walking close to the camera also shifts the correlation peak; only a moving
        # camera makes the shifted previous frame match the whole new one much better.
        shift = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]], np.float32)
        moved = cv2.warpAffine(prev, shift, (prev.shape[1], prev.shape[0]), borderMode=cv2.BORDER_REPLICATE)
        m = max(2, int(np.ceil(max(abs(dx), abs(dy)))) + 1)
        inner = (slice(m, -m), slice(m, -m))
        still = float(cv2.absdiff(small, prev)[inner].mean())
        shifted = float(cv2.absdiff(small, moved)[inner].mean())
        return (dx * scale, dy * scale) if shifted < 0.7 * still else None

    def _small(self, gray: UInt8Array) -> FloatArray:
        h, w = gray.shape[:2]
        width = min(self.cfg.width, w)
        height = max(1, round(h * width / w))
        small = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
        return cast(FloatArray, small.astype(np.float32))

    def _mask(self, small: FloatArray, bg: FloatArray) -> UInt8Array:
        diff = cv2.absdiff(small, bg)
        _, mask = cv2.threshold(diff, float(self.cfg.threshold), 255.0, cv2.THRESH_BINARY)
        return cast(UInt8Array, cv2.dilate(mask.astype(np.uint8), DILATE_KERNEL, iterations=2))

    def _learn(self, small: FloatArray, mask: UInt8Array) -> None:
        assert self._bg is not None
        still = cv2.bitwise_not(mask)
        cv2.accumulateWeighted(small, self._bg, self.cfg.alpha, mask=still)
        cv2.accumulateWeighted(small, self._bg, self.cfg.alpha / MOVING_SLOWDOWN, mask=mask)

    def _boxes(self, mask: UInt8Array, sx: float, sy: float) -> list[Box]:
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        min_px = self.cfg.min_area * mask.size
        boxes = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            if bw * bh >= min_px:
                boxes.append(Box(int(x * sx), int(y * sy), int(np.ceil(bw * sx)), int(np.ceil(bh * sy))))
        return boxes


def _match_brightness(small: FloatArray, bg: FloatArray) -> FloatArray:
    """The frame scaled so its mean brightness is the background's (bounded gain)."""
    mean = float(small.mean())
    if mean < 1.0:
        return small
    gain = min(2.0, max(0.5, float(bg.mean()) / mean))
    return cast(FloatArray, small * gain)


def grow(box: Box, pad: int, min_side: int, width: int, height: int) -> Box:
    """The box grown by ``pad`` on every side, at least ``min_side`` square, clipped to the frame."""
    x0, y0 = box.x - pad, box.y - pad
    x1, y1 = box.x + box.w + pad, box.y + box.h + pad
    if x1 - x0 < min_side:
        cx = (x0 + x1) // 2
        x0, x1 = cx - min_side // 2, cx + (min_side + 1) // 2
    if y1 - y0 < min_side:
        cy = (y0 + y1) // 2
        y0, y1 = cy - min_side // 2, cy + (min_side + 1) // 2
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    return Box(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def merge(boxes: list[Box]) -> list[Box]:
    """Union of overlapping boxes until none overlap (search each pixel once)."""
    out = [b for b in boxes if b.w > 0 and b.h > 0]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                if _touch(out[i], out[j]):
                    a, b = out[i], out[j]
                    x0, y0 = min(a.x, b.x), min(a.y, b.y)
                    x1, y1 = max(a.x + a.w, b.x + b.w), max(a.y + a.h, b.y + b.h)
                    out[i] = Box(x0, y0, x1 - x0, y1 - y0)
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return out


def _touch(a: Box, b: Box) -> bool:
    return a.x < b.x + b.w and b.x < a.x + a.w and a.y < b.y + b.h and b.y < a.y + a.h


def area(boxes: list[Box]) -> int:
    return sum(b.w * b.h for b in boxes)

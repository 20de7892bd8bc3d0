"""Crop geometry shared by the detect service and the CLI: a square around each face, with margin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import cv2

from shared.detection.base import Detector
from shared.imaging import FACE_SIZE, UInt8Array, to_gray
from shared.schema import Box


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

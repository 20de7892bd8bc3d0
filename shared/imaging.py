"""Pixel helpers shared by training, evaluation and serving, so all three resize alike."""

from __future__ import annotations

from typing import cast

import cv2
import numpy as np
import numpy.typing as npt

FACE_SIZE = 64

UInt8Array = npt.NDArray[np.uint8]


def to_gray(image: UInt8Array) -> UInt8Array:
    """BGR/BGRA/grey image -> 2-D grey uint8."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 4:
        return cast(UInt8Array, cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY))
    return cast(UInt8Array, cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))


def resize_face(face: UInt8Array, size: int = FACE_SIZE) -> UInt8Array:
    """Resize one grey face to size x size: area filter shrinking, bilinear enlarging."""
    if face.shape[0] != face.shape[1]:
        side = min(face.shape[:2])  # centre square, so faces keep their aspect ratio
        y0, x0 = (face.shape[0] - side) // 2, (face.shape[1] - side) // 2
        face = face[y0:y0 + side, x0:x0 + side]
    if face.shape[0] == size and face.shape[1] == size:
        return face
    shrinking = face.shape[0] > size or face.shape[1] > size
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cast(UInt8Array, cv2.resize(face, (size, size), interpolation=interp))


def resize_faces(faces: UInt8Array, size: int = FACE_SIZE) -> UInt8Array:
    """(N, H, W) uint8 -> (N, size, size) uint8 with :func:`resize_face`."""
    if faces.ndim != 3:
        raise ValueError(f"expected (N, H, W) grey images, got shape {faces.shape}")
    if faces.shape[1:] == (size, size):
        return np.ascontiguousarray(faces, dtype=np.uint8)
    out = np.empty((faces.shape[0], size, size), dtype=np.uint8)
    for i, face in enumerate(faces):
        out[i] = resize_face(face, size)
    return out

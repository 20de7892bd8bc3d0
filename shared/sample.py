"""The demo's sample video: a real face (scikit-image's astronaut photo) moving across the frame.

Generated on first use into the user's cache, so the repository ships no video.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import cv2
import numpy as np

from shared.imaging import UInt8Array

WIDTH, HEIGHT, FPS, SECONDS = 640, 480, 10, 8


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emotion-stream"


def astronaut_bgr() -> UInt8Array:
    from skimage import data  # the photo ships inside the scikit-image wheel

    return cast(UInt8Array, cv2.cvtColor(np.asarray(data.astronaut()), cv2.COLOR_RGB2BGR))


def render_frames(n: int = FPS * SECONDS, width: int = WIDTH, height: int = HEIGHT) -> list[UInt8Array]:
    """The photo, scaled to 3/4 of the frame height, panning left to right and back."""
    photo = astronaut_bgr()
    side = int(height * 0.75)
    photo = cast(UInt8Array, cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA))
    frames = []
    y = (height - side) // 2
    for i in range(n):
        phase = 0.5 - 0.5 * np.cos(2 * np.pi * i / max(1, n))
        x = round(phase * (width - side))
        canvas = np.full((height, width, 3), 60, dtype=np.uint8)
        canvas[y:y + side, x:x + side] = photo
        frames.append(canvas)
    return frames


def write_video(path: Path, frames: list[UInt8Array], fps: float = FPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial" + path.suffix)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write video {tmp}")
    for frame in frames:
        writer.write(frame)
    writer.release()
    tmp.replace(path)
    return path


def sample_video() -> Path:
    """Path of the sample video, created if missing."""
    path = cache_dir() / "sample-astronaut.mp4"
    if not path.exists():
        write_video(path, render_frames())
    return path

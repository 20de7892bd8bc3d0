"""Whole-frame search on keyframes and, in between, only around the faces already known
(``detector.keyframe_interval``; the motion gate is the default path)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.detection.base import Detector, DetectorSettings, GateReport, overlap, search_around
from shared.imaging import UInt8Array
from shared.schema import Box


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

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None, lag_s: float = 0.0) -> list[Box]:
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
            if moved is not None and all(overlap(moved, other) < 0.5 for other in found):
                found.append(moved)
        return found



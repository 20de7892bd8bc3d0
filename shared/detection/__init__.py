"""Face detection: detector backends, the per-camera detectors built on them, and crop geometry.

- :mod:`shared.detection.base`: settings, the ``Detector`` protocol (Haar, DNN), the search
  around a known face, and the ``CameraDetector`` protocol the detect service and the CLI use;
- :mod:`shared.detection.gate`: the default camera detector (motion-gated search, faces followed
  by their look between detector confirmations);
- :mod:`shared.detection.appearance`: following a face by its look;
- :mod:`shared.detection.keyframes`: whole-frame keyframes with searches around known faces between;
- :mod:`shared.detection.crop`: the square face crops.
"""

from shared.detection.base import (
    CameraDetector,
    Detector,
    DetectorSettings,
    DnnDetector,
    EveryFrame,
    GateReport,
    HaarDetector,
    default_cascade,
    make_detector,
    overlap,
    search_around,
)
from shared.detection.crop import CropRegion, DetectedFace, crop_face, crop_faces, crop_region, detect_and_crop
from shared.detection.gate import GatedDetector
from shared.detection.keyframes import FollowingDetector

__all__ = [
    "CameraDetector", "CropRegion", "DetectedFace", "Detector", "DetectorSettings", "DnnDetector", "EveryFrame",
    "FollowingDetector", "GateReport", "GatedDetector", "HaarDetector", "crop_face", "crop_faces", "crop_region",
    "default_cascade", "detect_and_crop", "make_camera_detector", "make_detector", "overlap", "search_around",
]


def make_camera_detector(cfg: DetectorSettings, base: Detector | None = None) -> CameraDetector:
    """The default path (motion-gated, faces followed), or following between keyframes, or every whole frame."""
    base = base or make_detector(cfg)
    if cfg.motion.enabled:
        return GatedDetector(base, cfg)
    if cfg.keyframe_interval:
        return FollowingDetector(base, cfg)
    return EveryFrame(base)

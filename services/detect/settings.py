"""Detect settings."""

from __future__ import annotations

from pydantic import Field

from shared.cameras import CameraSettings
from shared.detection import DetectorSettings
from shared.settings import Section, ServiceSettings


class DetectOptions(Section):
    group: str = Field("detect", min_length=1, description="consumer group on the frame streams")
    max_frame_age_s: float = Field(1.0, gt=0, le=3600,
                                   description="older frames are skipped (latest-frame semantics) and counted")
    read_count: int = Field(4, ge=1, le=1000, description="entries taken per XREADGROUP")
    faces_maxlen: int = Field(10_000, ge=100, description="approximate cap of the faces stream")
    max_pixels: int = Field(40_000_000, ge=10_000, description="frames with more pixels are dead-lettered")
    cameras_refresh_s: float = Field(2.0, gt=0, le=600, description="how often to look for new camera streams")
    opencv_threads: int = Field(1, ge=0, le=64, description="OpenCV threads per worker (0 = OpenCV's default)")
    lease_s: float = Field(3.0, ge=0.5, le=300,
                           description="a worker owns a camera's frames while it renews this lease (frames of one "
                                       "camera in capture order, on one worker); a dead worker's cameras are taken "
                                       "over once its leases lapse")


class DetectSettings(ServiceSettings):
    detect: DetectOptions = DetectOptions()
    detector: DetectorSettings = DetectorSettings()
    cameras: list[CameraSettings] = Field(default_factory=list, description="the pipeline's cameras (ingest's "
                                          "section): their mask and zones, while ingest is not dynamic (else the "
                                          "camera registry's are used)")

"""Ingest settings: the cameras and how frames are published."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from shared.settings import Section, ServiceSettings
from shared.sources import source_kind


class CameraSettings(Section):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="camera id")
    url: str = Field(min_length=1, description="file path, rtsp://, http(s):// MJPEG URL, or USB device index")
    fps: float = Field(10.0, ge=0.0, le=120.0, description="target frames/s (0 = as fast as the source gives)")
    loop: bool = Field(False, description="files: start again at the end instead of ending")
    jpeg_quality: int | None = Field(None, ge=10, le=100, description="override of the service's JPEG quality")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        source_kind(v)
        return v


class IngestOptions(Section):
    jpeg_quality: int = Field(80, ge=10, le=100, description="JPEG quality of published frames")
    grayscale: bool = Field(True, description="publish grey JPEGs (detection and the model only use grey)")
    max_width: int = Field(1920, ge=64, le=8192, description="wider frames are downscaled to this width")
    stream_maxlen: int = Field(300, ge=10, le=1_000_000, description="approximate cap of each frame stream")
    watchdog_s: float = Field(5.0, gt=0, le=600, description="a live source with no frame this long is down")
    reconnect_initial_s: float = Field(0.5, gt=0, le=60, description="first reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="cap of the reconnect delay")
    open_timeout_s: float = Field(10.0, gt=0, le=120, description="FFmpeg open timeout for network sources")
    backpressure_lag: int = Field(150, ge=1, description="stop publishing a camera while its stream holds this many "
                                  "frames no detect worker has read yet (Redis >= 7); must stay below stream_maxlen")
    detect_group: str = Field("detect", min_length=1, description="the detect consumer group, for backpressure")
    max_frame_bytes: int = Field(8_000_000, ge=10_000, description="frames whose JPEG is larger are dropped")


class IngestSettings(ServiceSettings):
    cameras: list[CameraSettings] = Field(default_factory=list, description="the cameras to read")
    ingest: IngestOptions = IngestOptions()

    @model_validator(mode="after")
    def _lag_below_maxlen(self) -> IngestSettings:
        if self.ingest.backpressure_lag >= self.ingest.stream_maxlen:
            raise ValueError(f"ingest.backpressure_lag ({self.ingest.backpressure_lag}) must be below "
                             f"ingest.stream_maxlen ({self.ingest.stream_maxlen}): trimming would drop unread frames")
        return self

    @model_validator(mode="after")
    def _unique_ids(self) -> IngestSettings:
        seen: set[str] = set()
        for cam in self.cameras:
            if cam.id in seen:
                raise ValueError(f"camera id {cam.id!r} is used twice")
            seen.add(cam.id)
        return self

"""Ingest settings: the cameras and how frames are published."""

from __future__ import annotations

from pydantic import Field, model_validator

from shared.cameras import CameraSettings, SourcePolicySettings
from shared.settings import ServiceSettings


class IngestOptions(SourcePolicySettings):
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
    dynamic: bool = Field(False, description="cameras live in Redis (seeded from this file), shared between "
                          "ingest replicas through leases, and can be changed while running")
    lease_s: float = Field(5.0, gt=0.5, le=600, description="a dead replica's cameras are taken over after this long")
    refresh_s: float = Field(1.0, gt=0, le=60, description="how often camera changes and leases are checked")
    max_frame_bytes: int = Field(8_000_000, ge=10_000, description="frames whose JPEG is larger are dropped")


class IngestSettings(ServiceSettings):
    cameras: list[CameraSettings] = Field(default_factory=list, description="the cameras to read")
    ingest: IngestOptions = IngestOptions()

    @model_validator(mode="after")
    def _lag_below_maxlen(self) -> IngestSettings:
        if self.ingest.backpressure_lag >= self.ingest.stream_maxlen:
            raise ValueError(f"ingest.backpressure_lag ({self.ingest.backpressure_lag}) must be below "
                             f"ingest.stream_maxlen ({self.ingest.stream_maxlen}): trimming would drop unread frames")
        if self.ingest.refresh_s * 2 > self.ingest.lease_s:
            raise ValueError(f"ingest.refresh_s ({self.ingest.refresh_s}) must be at most half of ingest.lease_s "
                             f"({self.ingest.lease_s}), so leases are renewed before they lapse")
        return self

    @model_validator(mode="after")
    def _unique_ids(self) -> IngestSettings:
        seen: set[str] = set()
        for cam in self.cameras:
            if cam.id in seen:
                raise ValueError(f"camera id {cam.id!r} is used twice")
            seen.add(cam.id)
        return self

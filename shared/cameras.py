"""Cameras: their settings, and the registry in Redis that live camera management uses.

Keys: ``<prefix>:camera-config`` (hash id -> settings JSON), ``<prefix>:camera-status`` (hash
id -> status JSON written by the owning ingest replica), ``<prefix>:lease:{id}`` (owner, with
a TTL) and ``<prefix>:ingest-replicas`` (sorted set of replica heartbeats).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.leases import LeasePool
from shared.settings import Section, format_errors
from shared.sources import SourcePolicy, source_kind
from shared.zones import MAX_POLYGONS, Polygon, Zone, check_zone_names


class CameraSettings(Section):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="camera id")
    url: str = Field(min_length=1, description="file path, rtsp://, http(s):// MJPEG URL, or USB device index")
    fps: float = Field(10.0, ge=0.0, le=120.0, description="target frames/s (0 = as fast as the source gives)")
    loop: bool = Field(False, description="files: start again at the end instead of ending")
    jpeg_quality: int | None = Field(None, ge=10, le=100, description="override of the service's JPEG quality")
    mask: list[Polygon] = Field(default_factory=list, max_length=MAX_POLYGONS,
                                description="polygons where faces are ignored: not searched, no motion counted, a face "
                                            "whose centre is inside dropped (pixels, or fractions 0..1)")
    zones: list[Zone] = Field(default_factory=list, max_length=MAX_POLYGONS,
                              description="named polygons; each event carries the zones its face centre is in")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        source_kind(v)
        return v

    @model_validator(mode="after")
    def _unique_zones(self) -> CameraSettings:
        check_zone_names(self.zones)
        return self

    def reader_view(self) -> dict[str, object]:
        """The settings a camera reader uses: a change of mask or zones needs no reconnect."""
        return self.model_dump(exclude={"mask", "zones"})



class SourcePolicySettings(Section):
    """The camera source policy's keys; they live in the ``ingest`` section of every service that reads them."""

    allow_local_sources: bool = Field(False, description="cameras added at run time (web view, emotion-stream "
                                      "cameras) may be local files and devices; files only under media_root")
    media_root: Path | None = Field(None, description="the folder local file cameras must be in (with "
                                    "allow_local_sources)")
    allowed_source_hosts: list[str] = Field(default_factory=list, description="when not empty, network cameras "
                                            "added at run time must be on one of these hosts")

    def policy(self) -> SourcePolicy:
        return SourcePolicy(allow_local=self.allow_local_sources, media_root=self.media_root,
                            allowed_hosts=tuple(h.lower() for h in self.allowed_source_hosts))


class SourcePolicyView(SourcePolicySettings):
    """The policy keys as the web view and the cameras command read them from the ``ingest`` section
    (the rest of that section is ingest's to validate)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class CameraRegistry:
    """Camera settings, status and ownership leases in Redis.

    :meth:`put` (the web view's admin, ``emotion-stream cameras``) checks each camera against the
    source policy, network sources only by default; :meth:`seed` adds the operator's settings
    file as it is.
    """

    def __init__(self, r: redis.Redis, prefix: str = "es", policy: SourcePolicy | None = None) -> None:
        self.r = r
        self.prefix = prefix
        self.policy = policy or SourcePolicy()
        self.config_key = f"{prefix}:camera-config"
        self.status_key = f"{prefix}:camera-status"
        self.replicas_key = f"{prefix}:ingest-replicas"
        self.cameras_key = f"{prefix}:cameras"
        self.leases = LeasePool(r, f"{prefix}:lease", self.replicas_key)

    def lease_key(self, camera: str) -> str:
        return self.leases.lease_key(camera)

    # -- settings -----------------------------------------------------------

    def seed(self, cameras: list[CameraSettings]) -> None:
        """Add the file's cameras that Redis does not know yet (Redis wins: it holds live edits)."""
        for cam in cameras:
            self.r.hsetnx(self.config_key, cam.id, cam.model_dump_json())

    def put(self, cam: CameraSettings, must_exist: bool | None = None) -> None:
        """Add or change a camera; :class:`~shared.sources.SourceRefusedError` when the policy forbids its URL."""
        self.policy.check(cam.url)
        exists = bool(self.r.hexists(self.config_key, cam.id))
        if must_exist is True and not exists:
            raise KeyError(f"camera {cam.id!r} does not exist")
        if must_exist is False and exists:
            raise KeyError(f"camera {cam.id!r} already exists")
        self.r.hset(self.config_key, cam.id, cam.model_dump_json())

    def remove(self, camera: str) -> bool:
        """Forget the camera; detect workers also stop polling its stream (they read ``cameras_key``)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(self.config_key, camera)
        pipe.hdel(self.status_key, camera)
        pipe.srem(self.cameras_key, camera)
        removed = pipe.execute()[0]
        return bool(removed)

    def cameras(self) -> tuple[dict[str, CameraSettings], list[str]]:
        """Valid cameras by id, and one message per entry that does not validate."""
        good: dict[str, CameraSettings] = {}
        bad: list[str] = []
        for key, raw in self.r.hgetall(self.config_key).items():
            cid = key.decode() if isinstance(key, bytes) else str(key)
            try:
                good[cid] = CameraSettings.model_validate_json(raw)
            except ValidationError as exc:
                bad.append(f"camera {cid}: " + "; ".join(format_errors(exc)))
        return good, bad

    # -- leases and replicas -------------------------------------------------

    def hold(self, camera: str, owner: str, lease_s: float) -> bool:
        """Take or renew the camera's lease; False when another replica holds it."""
        return self.leases.hold(camera, owner, lease_s)

    def release(self, camera: str, owner: str) -> None:
        self.leases.release(camera, owner)

    def owner(self, camera: str) -> str | None:
        return self.leases.owner(camera)

    def beat(self, replica: str, lease_s: float) -> int:
        """Record this replica as alive; returns how many replicas are alive."""
        return self.leases.beat(replica, lease_s)

    def leave(self, replica: str) -> None:
        self.leases.leave(replica)

    # -- status ---------------------------------------------------------------

    def write_status(self, camera: str, status: dict[str, Any]) -> None:
        self.r.hset(self.status_key, camera, json.dumps({**status, "updated": time.time()}))

    def statuses(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key, raw in self.r.hgetall(self.status_key).items():
            cid = key.decode() if isinstance(key, bytes) else str(key)
            try:
                out[cid] = json.loads(raw)
            except ValueError:
                continue
        return out

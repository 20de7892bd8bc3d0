"""Read-only views the page asks for: cameras and their state, the frame to show, pipeline health.

Everything comes from Redis (frame streams, the camera registry, consumer groups) or from the
services' metrics endpoints; nothing here decodes video or runs detection.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from services.web.settings import MetricsEndpoint, WebOptions
from shared.cameras import CameraRegistry, CameraSettings
from shared.masking import mask_text
from shared.schema import FIELD, DecodeError, FrameMsg, decode_frame
from shared.settings import mask_url
from shared.streams import Keys, group_stats

STATUS_FRESH_S = 30.0  # the registry's camera status is written every refresh_s; older means no owner
LIVE_FRAME_S = 5.0  # without a status, a camera whose newest frame is younger than this counts as up
INGEST_DELAY_S = 2.0  # a frame is added to its stream at most this long after its capture


@dataclass(frozen=True)
class FrameRef:
    """A frame in a camera's stream, without its pixels."""

    stream_id: str
    seq: int
    capture_ts: float
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.stream_id, "seq": self.seq, "capture_ts": self.capture_ts, "width": self.width,
                "height": self.height}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(entry_id: Any, fields: Any) -> tuple[str, FrameMsg] | None:
    try:
        return _text(entry_id), decode_frame((fields or {}).get(FIELD, b""))
    except DecodeError:
        return None


def find_frame(r: Any, keys: Keys, camera: str, seq: int | None = None, scan: int = 1,
               captured: float | None = None) -> FrameRef | None:
    """The frame with sequence number ``seq``, else the newest frame searched.

    Stream ids are the time ingest added the frame (just after its capture), so the search walks
    back ``scan`` entries from a little after ``captured`` instead of from the newest frame.
    """
    newest_id = "+" if captured is None else f"{int((captured + INGEST_DELAY_S) * 1000)}"
    rows = r.xrevrange(keys.frames(camera), max=newest_id, count=scan if seq is not None else 1)
    frames = [f for f in (_decoded(i, fields) for i, fields in rows) if f is not None]
    if not frames:
        return None
    chosen = next((f for f in frames if f[1].seq == seq), frames[0])
    sid, msg = chosen
    return FrameRef(sid, msg.seq, msg.capture_ts, msg.width, msg.height)


def frame_jpeg(r: Any, keys: Keys, camera: str, stream_id: str) -> bytes | None:
    """The JPEG of one frame entry, as ingest published it (no re-encoding)."""
    rows = r.xrange(keys.frames(camera), min=stream_id, max=stream_id, count=1)
    if not rows:
        return None
    found = _decoded(*rows[0])
    return found[1].jpeg if found is not None else None


def dynamic_ingest_alive(r: Any, registry: CameraRegistry) -> bool:
    """True when an ingest replica in dynamic mode has beaten recently (camera changes take effect)."""
    return bool(r.zcount(registry.replicas_key, time.time() - STATUS_FRESH_S, "+inf"))


def camera_list(r: Any, keys: Keys, registry: CameraRegistry, static: Sequence[CameraSettings] = ()) -> dict[str, Any]:
    """Cameras with masked URLs and state: the registry's when it has any (dynamic ingest), else the
    settings file's (``static``) and those ingest announced."""
    configured, invalid = registry.cameras()
    statuses = registry.statuses()
    if configured:
        ids = sorted(configured)
    else:
        configured = {c.id: c for c in static}
        ids = sorted(set(configured) | {_text(c) for c in r.smembers(keys.cameras)})
    cams = []
    for cid in ids:
        cfg = configured.get(cid)
        entry: dict[str, Any] = {"id": cid, "url": mask_url(cfg.url) if cfg else None,
                                 "fps": cfg.fps if cfg else None, "loop": cfg.loop if cfg else None,
                                 "mask": cfg.model_dump()["mask"] if cfg else [],
                                 "zones": cfg.model_dump()["zones"] if cfg else []}
        entry.update(_state(r, keys, cid, statuses.get(cid)))
        cams.append(entry)
    return {"cameras": cams, "invalid": invalid, "dynamic": dynamic_ingest_alive(r, registry)}


def _state(r: Any, keys: Keys, camera: str, status: dict[str, Any] | None) -> dict[str, Any]:
    if status is not None and time.time() - float(status.get("updated", 0)) <= STATUS_FRESH_S:
        return {"state": str(status.get("state", "unknown")), "owner": status.get("owner"),
                "measured_fps": status.get("fps"), "last_frame_age_s": status.get("last_frame_age_s"),
                "last_error": mask_text(str(status.get("last_error") or "")) or None}
    newest = find_frame(r, keys, camera)
    age = round(time.time() - newest.capture_ts, 2) if newest else None
    state = "up" if age is not None and age < LIVE_FRAME_S else ("idle" if newest else "no frames")
    return {"state": state, "owner": None, "measured_fps": None, "last_frame_age_s": age, "last_error": None}


# ----------------------------------------------------------------------------- health


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    ok: bool
    heartbeat_age_s: float | None
    dropped: dict[str, float]
    frames_read: float
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "heartbeat_age_s": self.heartbeat_age_s, "dropped": self.dropped,
                "frames_read": self.frames_read, "error": self.error}


def scrape(endpoint: MetricsEndpoint, timeout: float = 1.5) -> ServiceHealth:
    """Heartbeat age, drops by reason and frames read, from one service's /metrics."""
    try:
        with urllib.request.urlopen(endpoint.url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return ServiceHealth(endpoint.name, False, None, {}, 0.0, mask_text(f"metrics unreachable: {exc}"))
    beat: float | None = None
    dropped: dict[str, float] = {}
    read = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "es_heartbeat_timestamp_seconds" and sample.value > 0:
                beat = sample.value
            elif sample.name == "es_frames_dropped_total":
                reason = sample.labels.get("reason", "?")
                dropped[reason] = dropped.get(reason, 0.0) + sample.value
            elif sample.name == "es_frames_read_total":
                read += sample.value
    age = round(max(0.0, time.time() - beat), 2) if beat is not None else None
    return ServiceHealth(endpoint.name, age is not None and age < 60, age, dropped, read, None)


def stream_lags(r: Any, keys: Keys, opts: WebOptions, cameras: list[str]) -> list[dict[str, Any]]:
    """Length, pending and lag of each camera's frame stream (detect) and the faces stream (classify)."""
    rows = []
    checks = [(keys.frames(c), opts.detect_group) for c in cameras] + [(keys.faces, opts.classify_group)]
    for stream, group in checks:
        stats = group_stats(r, stream, group)
        rows.append({"stream": stream, "group": group, "length": stats.length if stats else None,
                     "pending": stats.pending if stats else None, "lag": stats.lag if stats else None})
    return rows

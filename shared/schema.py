"""Wire schema: every message on the Redis streams, encoded with msgpack, and nothing else.

Each payload is a msgpack map with ``v`` (the schema version) and ``k`` (the kind). Decoding
is strict: an unknown version, a missing or mistyped field, a non-finite number or bytes that are
not msgpack all raise :class:`DecodeError`, whose ``reason`` is a short metric label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

SCHEMA_VERSION = 2
# Version 2 added the zones of faces and events (``z``); version 1 messages (no zones, read as
# none) are still decoded, so a pipeline can be upgraded while its streams hold old entries.
DECODABLE_VERSIONS = (1, 2)
FIELD = b"m"  # the single stream-entry field that carries the payload
# Zone filters and metric labels name a face in no zone so (a zone may not be called that).
NO_ZONE = "none"


class DecodeError(ValueError):
    """A payload that cannot be turned into a message; ``reason`` labels the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Box:
    """Face rectangle in frame pixels."""

    x: int
    y: int
    w: int
    h: int

    def to_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


@dataclass(frozen=True)
class FrameMsg:
    """One captured frame, JPEG-encoded, as ingest publishes it."""

    camera: str
    seq: int
    capture_ts: float  # unix seconds at capture
    width: int
    height: int
    jpeg: bytes


@dataclass(frozen=True)
class FaceCrop:
    box: Box
    crop: bytes  # size*size grey uint8, row-major
    zones: tuple[str, ...] = ()  # names of the camera's zones the face's centre is in


@dataclass(frozen=True)
class FacesMsg:
    """The faces detect found in one frame."""

    camera: str
    seq: int
    capture_ts: float
    detect_ts: float
    size: int
    faces: tuple[FaceCrop, ...]


@dataclass(frozen=True)
class EventMsg:
    """One classified face: what downstream consumers receive."""

    event_id: str
    camera: str
    seq: int
    face: int
    capture_ts: float
    publish_ts: float
    box: Box
    label: str
    score: float
    classes: tuple[str, ...]
    probs: tuple[float, ...]
    model_version: str
    track_id: int | None = None
    zones: tuple[str, ...] = ()  # the camera's zones the face's centre is in, in the camera's order

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (used by ``--json`` output and the Python client)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "event_id": self.event_id,
            "camera": self.camera,
            "seq": self.seq,
            "face": self.face,
            "capture_ts": self.capture_ts,
            "publish_ts": self.publish_ts,
            "latency_ms": round((self.publish_ts - self.capture_ts) * 1000.0, 2),
            "box": self.box.to_list(),
            "label": self.label,
            "score": round(self.score, 5),
            "probabilities": {c: round(p, 5) for c, p in zip(self.classes, self.probs, strict=True)},
            "model_version": self.model_version,
            "track_id": self.track_id,
            "zones": list(self.zones),
        }


@dataclass(frozen=True)
class TrackEventMsg:
    """A track-level event: started, changed (from -> to) or ended (with a summary)."""

    kind: str
    camera: str
    track_id: int
    ts: float
    emotion: str
    confidence: float
    previous: str | None = None
    previous_duration_s: float | None = None
    duration_s: float | None = None
    time_per_emotion_s: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **{k: v for k, v in self.__dict__.items() if v is not None}}


TRACK_KINDS = ("started", "changed", "ended")


def event_id(camera: str, seq: int, face: int) -> str:
    """Stable id: a frame re-processed after a crash yields the same ids, so consumers can dedupe."""
    return f"{camera}:{seq}:{face}"


# ---------------------------------------------------------------- encoding


def _pack(kind: str, body: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "k": kind, **body}, use_bin_type=True)  # type: ignore[no-any-return]


def encode_frame(m: FrameMsg) -> bytes:
    return _pack("frame", {"cam": m.camera, "seq": m.seq, "ts": m.capture_ts, "w": m.width, "h": m.height,
                           "jpg": m.jpeg})


def encode_faces(m: FacesMsg) -> bytes:
    faces = [{"b": f.box.to_list(), "c": f.crop, "z": list(f.zones)} for f in m.faces]
    return _pack("faces", {"cam": m.camera, "seq": m.seq, "ts": m.capture_ts, "dts": m.detect_ts,
                           "s": m.size, "f": faces})


def encode_event(m: EventMsg) -> bytes:
    return _pack("event", {
        "id": m.event_id, "cam": m.camera, "seq": m.seq, "face": m.face, "ts": m.capture_ts,
        "pts": m.publish_ts, "b": m.box.to_list(), "l": m.label, "s": m.score, "cls": list(m.classes),
        "p": list(m.probs), "mv": m.model_version, "tid": m.track_id,
        "z": list(m.zones),
    })


def encode_track(m: TrackEventMsg) -> bytes:
    return _pack("track", {"kind": m.kind, "cam": m.camera, "tid": m.track_id, "ts": m.ts, "e": m.emotion,
                           "c": m.confidence, "prev": m.previous, "pd": m.previous_duration_s, "d": m.duration_s,
                           "tpe": m.time_per_emotion_s})


# ---------------------------------------------------------------- decoding


def _unpack(data: bytes, kind: str) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray)):
        raise DecodeError("bad_type", f"payload is {type(data).__name__}, not bytes")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise DecodeError("garbage", f"not msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DecodeError("garbage", f"payload is a msgpack {type(obj).__name__}, not a map")
    version = obj.get("v")
    if isinstance(version, bool) or version not in DECODABLE_VERSIONS:
        raise DecodeError("schema_version", f"schema version {version!r}, expected one of {DECODABLE_VERSIONS}")
    if obj.get("k") != kind:
        raise DecodeError("wrong_kind", f"message kind {obj.get('k')!r}, expected {kind!r}")
    return obj


def _get(obj: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise DecodeError("missing_field", f"field {key!r} missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, typ):
        raise DecodeError("bad_field", f"field {key!r} has type {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError("bad_field", f"field {key!r} is not finite ({value})")
    return value


def _num(obj: dict[str, Any], key: str) -> float:
    return float(_get(obj, key, (int, float)))


def _nonneg_int(obj: dict[str, Any], key: str) -> int:
    value = int(_get(obj, key, int))
    if value < 0:
        raise DecodeError("bad_field", f"field {key!r} is negative ({value})")
    return value


def _camera(obj: dict[str, Any]) -> str:
    cam = str(_get(obj, "cam", str))
    if not cam:
        raise DecodeError("bad_field", "field 'cam' is empty")
    return cam


def _box(value: Any) -> Box:
    if not isinstance(value, list) or len(value) != 4 or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise DecodeError("bad_field", f"box must be 4 integers, got {value!r}")
    x, y, w, h = value
    if w <= 0 or h <= 0:
        raise DecodeError("bad_field", f"box has non-positive size {value!r}")
    return Box(x, y, w, h)


MAX_ZONES = 16
MAX_ZONE_NAME = 32


def _zones(obj: dict[str, Any]) -> tuple[str, ...]:
    """Zone names (absent in version 1: none); bounded, since consumers use them as metric labels."""
    value = obj.get("z", [])
    if not isinstance(value, list) or len(value) > MAX_ZONES or not all(
            isinstance(z, str) and 0 < len(z) <= MAX_ZONE_NAME for z in value):
        raise DecodeError("bad_field", f"zones must be at most {MAX_ZONES} names of 1-{MAX_ZONE_NAME} characters, "
                                       f"got {value!r}"[:200])
    return tuple(value)


def decode_frame(data: bytes) -> FrameMsg:
    o = _unpack(data, "frame")
    msg = FrameMsg(camera=_camera(o), seq=_nonneg_int(o, "seq"), capture_ts=_num(o, "ts"),
                   width=_nonneg_int(o, "w"), height=_nonneg_int(o, "h"), jpeg=bytes(_get(o, "jpg", bytes)))
    if not msg.jpeg:
        raise DecodeError("bad_field", "field 'jpg' is empty")
    return msg


def decode_faces(data: bytes) -> FacesMsg:
    o = _unpack(data, "faces")
    size = _nonneg_int(o, "s")
    faces = []
    for item in _get(o, "f", list):
        if not isinstance(item, dict):
            raise DecodeError("bad_field", "face entry is not a map")
        crop = bytes(_get(item, "c", bytes))
        if len(crop) != size * size:
            raise DecodeError("bad_field", f"crop has {len(crop)} bytes, expected {size * size}")
        faces.append(FaceCrop(box=_box(item.get("b")), crop=crop, zones=_zones(item)))
    return FacesMsg(camera=_camera(o), seq=_nonneg_int(o, "seq"), capture_ts=_num(o, "ts"),
                    detect_ts=_num(o, "dts"), size=size, faces=tuple(faces))


def decode_event(data: bytes) -> EventMsg:
    o = _unpack(data, "event")
    classes = tuple(str(c) for c in _get(o, "cls", list))
    probs_raw = _get(o, "p", list)
    if len(probs_raw) != len(classes) or not all(
        isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) for p in probs_raw
    ):
        raise DecodeError("bad_field", "probabilities must be finite numbers, one per class")
    tid = o.get("tid")
    return EventMsg(
        event_id=str(_get(o, "id", str)), camera=_camera(o), seq=_nonneg_int(o, "seq"),
        face=_nonneg_int(o, "face"), capture_ts=_num(o, "ts"), publish_ts=_num(o, "pts"), box=_box(o.get("b")),
        label=str(_get(o, "l", str)), score=_num(o, "s"), classes=classes,
        probs=tuple(float(p) for p in probs_raw), model_version=str(_get(o, "mv", str)),
        track_id=tid if isinstance(tid, int) and not isinstance(tid, bool) else None, zones=_zones(o),
    )


def _opt_num(obj: dict[str, Any], key: str) -> float | None:
    return None if obj.get(key) is None else _num(obj, key)


def decode_track(data: bytes) -> TrackEventMsg:
    o = _unpack(data, "track")
    kind = str(_get(o, "kind", str))
    if kind not in TRACK_KINDS:
        raise DecodeError("bad_field", f"unknown track event kind {kind!r}")
    tpe = o.get("tpe")
    if tpe is not None and not (isinstance(tpe, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for k, v in tpe.items())):
        raise DecodeError("bad_field", "time_per_emotion must map names to finite numbers")
    prev = o.get("prev")
    return TrackEventMsg(
        kind=kind, camera=_camera(o), track_id=_nonneg_int(o, "tid"), ts=_num(o, "ts"), emotion=str(_get(o, "e", str)),
        confidence=_num(o, "c"), previous=prev if isinstance(prev, str) else None,
        previous_duration_s=_opt_num(o, "pd"), duration_s=_opt_num(o, "d"),
        time_per_emotion_s={k: float(v) for k, v in tpe.items()} if tpe is not None else None,
    )

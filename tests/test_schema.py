"""The wire schema: round trips, strict decoding, a fuzzed decoder."""

from __future__ import annotations

import contextlib
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.schema import (
    SCHEMA_VERSION,
    Box,
    DecodeError,
    EventMsg,
    FaceCrop,
    FacesMsg,
    FrameMsg,
    decode_event,
    decode_faces,
    decode_frame,
    encode_event,
    encode_faces,
    encode_frame,
    event_id,
)

FRAME = FrameMsg(camera="cam-1", seq=42, capture_ts=1700000000.25, width=640, height=480, jpeg=b"\xff\xd8jpeg")
FACES = FacesMsg(camera="cam-1", seq=42, capture_ts=1700000000.25, detect_ts=1700000000.3, size=4,
                 faces=(FaceCrop(Box(1, 2, 30, 40), bytes(range(16))), FaceCrop(Box(0, 0, 5, 5), bytes(16))))
CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
EVENT = EventMsg(event_id=event_id("cam-1", 42, 0), camera="cam-1", seq=42, face=0, capture_ts=1.5, publish_ts=1.6,
                 box=Box(1, 2, 30, 40), label="Happy", score=0.9, classes=CLASSES,
                 probs=(0.01, 0.0, 0.02, 0.9, 0.03, 0.02, 0.02), model_version="m1", track_id=None)


def test_round_trip_of_every_message_kind() -> None:
    assert decode_frame(encode_frame(FRAME)) == FRAME
    assert decode_faces(encode_faces(FACES)) == FACES
    assert decode_event(encode_event(EVENT)) == EVENT


def test_event_ids_are_stable_per_camera_frame_and_face() -> None:
    assert event_id("a", 1, 0) == event_id("a", 1, 0)
    assert len({event_id("a", 1, 0), event_id("a", 1, 1), event_id("a", 2, 0), event_id("b", 1, 0)}) == 4


def test_event_dict_lists_probabilities_by_class_name() -> None:
    d = EVENT.to_dict()
    assert d["probabilities"]["Happy"] == pytest.approx(0.9)
    assert list(d["probabilities"]) == list(CLASSES)
    assert d["schema_version"] == SCHEMA_VERSION


def _raw(**fields: object) -> bytes:
    base = {"v": SCHEMA_VERSION, "k": "frame", "cam": "c", "seq": 1, "ts": 1.0, "w": 2, "h": 2, "jpg": b"x"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...}, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1\xc1garbage", "garbage"),
        (b"", "garbage"),
        (msgpack.packb([1, 2, 3]), "garbage"),
        (_raw(v=SCHEMA_VERSION + 1), "schema_version"),
        (_raw(v=...), "schema_version"),
        (_raw(k="event"), "wrong_kind"),
        (_raw(cam=...), "missing_field"),
        (_raw(seq="1"), "bad_field"),
        (_raw(seq=-1), "bad_field"),
        (_raw(ts=math.nan), "bad_field"),
        (_raw(ts=math.inf), "bad_field"),
        (_raw(seq=True), "bad_field"),
        (_raw(jpg=b""), "bad_field"),
        (_raw(cam=""), "bad_field"),
    ],
)
def test_bad_frames_raise_decode_error_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_frame(payload)
    assert info.value.reason == reason


def test_faces_with_wrong_crop_size_or_box_are_rejected() -> None:
    bad_crop = FacesMsg(**{**FACES.__dict__, "faces": (FaceCrop(Box(1, 1, 2, 2), b"abc"),)})
    with pytest.raises(DecodeError, match="crop has 3 bytes"):
        decode_faces(encode_faces(bad_crop))
    bad_box = FacesMsg(**{**FACES.__dict__, "faces": (FaceCrop(Box(1, 1, 0, 2), bytes(16)),)})
    with pytest.raises(DecodeError, match="non-positive"):
        decode_faces(encode_faces(bad_box))


def test_event_with_nan_probability_is_rejected() -> None:
    bad = EventMsg(**{**EVENT.__dict__, "probs": (math.nan,) * 7})
    with pytest.raises(DecodeError, match="finite"):
        decode_event(encode_event(bad))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=256))
def test_decoders_raise_only_decode_error_on_random_bytes(data: bytes) -> None:
    for decode in (decode_frame, decode_faces, decode_event):
        with contextlib.suppress(DecodeError):
            decode(data)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(["v", "k", "cam", "seq", "ts", "w", "h", "jpg", "f", "s", "dts", "b", "c",
                                        "id", "face", "pts", "l", "cls", "p", "mv", "z"]), msgpack_values))
def test_decoders_survive_structured_garbage(fields: dict[str, object]) -> None:
    fields = {**fields, "v": SCHEMA_VERSION}
    for kind, decode in (("frame", decode_frame), ("faces", decode_faces), ("event", decode_event)):
        payload = msgpack.packb({**fields, "k": kind}, use_bin_type=True)
        with contextlib.suppress(DecodeError):
            decode(payload)


ZONED_FACES = FacesMsg(**{**FACES.__dict__, "faces": (FaceCrop(Box(1, 2, 30, 40), bytes(range(16)), ("door", "desk")),
                                                       FaceCrop(Box(0, 0, 5, 5), bytes(16)))})
ZONED_EVENT = EventMsg(**{**EVENT.__dict__, "zones": ("door",)})


def test_zones_of_faces_and_events_round_trip_at_version_2() -> None:
    assert SCHEMA_VERSION == 2
    assert decode_faces(encode_faces(ZONED_FACES)) == ZONED_FACES
    assert decode_event(encode_event(ZONED_EVENT)) == ZONED_EVENT
    assert msgpack.unpackb(encode_event(ZONED_EVENT))["z"] == ["door"]
    assert ZONED_EVENT.to_dict()["zones"] == ["door"] and EVENT.to_dict()["zones"] == []


def test_version_1_messages_without_zones_still_decode() -> None:
    """Entries written before zones existed (schema version 1) are read as faces in no zone."""
    v1_event = msgpack.unpackb(encode_event(ZONED_EVENT))
    v1_event.update(v=1)
    del v1_event["z"]
    assert decode_event(msgpack.packb(v1_event, use_bin_type=True)) == EVENT
    v1_faces = msgpack.unpackb(encode_faces(ZONED_FACES))
    v1_faces["v"] = 1
    for face in v1_faces["f"]:
        del face["z"]
    assert decode_faces(msgpack.packb(v1_faces, use_bin_type=True)) == FACES
    v1_frame = msgpack.unpackb(encode_frame(FRAME))
    v1_frame["v"] = 1
    assert decode_frame(msgpack.packb(v1_frame, use_bin_type=True)) == FRAME


@pytest.mark.parametrize("zones", ["door", ["door", 3], [""], ["x" * 33], ["z"] * 17])
def test_event_with_bad_zones_is_rejected(zones: object) -> None:
    raw = msgpack.unpackb(encode_event(ZONED_EVENT))
    raw["z"] = zones
    with pytest.raises(DecodeError, match="zones must be") as info:
        decode_event(msgpack.packb(raw, use_bin_type=True))
    assert info.value.reason == "bad_field"

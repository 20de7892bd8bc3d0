"""docs/wire-format.json agrees with shared/schema.py: every field written is documented, every
documented field is written, under the documented names, versions, streams and topics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest

import shared.schema as schema
from services.mqtt.topics import Topics, event_json
from shared.schema import Box, EventMsg, FaceCrop, FacesMsg, FrameMsg, TrackEventMsg
from shared.streams import Keys

ROOT = Path(__file__).resolve().parents[1]
DOC = json.loads((ROOT / "docs" / "wire-format.json").read_text())
DEFS = DOC["$defs"]
CLASSES = ("Angry", "Happy", "Neutral")

SAMPLES: dict[str, Any] = {
    "frame": FrameMsg(camera="door", seq=3, capture_ts=1.5, width=640, height=480, jpeg=b"\xff\xd8jpeg"),
    "faces": FacesMsg(camera="door", seq=3, capture_ts=1.5, detect_ts=1.6, size=2,
                      faces=(FaceCrop(box=Box(1, 2, 3, 4), crop=b"\x00\x01\x02\x03"),)),
    "event": EventMsg(event_id="door:3:0", camera="door", seq=3, face=0, capture_ts=1.5, publish_ts=1.7,
                      box=Box(1, 2, 3, 4), label="Happy", score=0.8, classes=CLASSES, probs=(0.1, 0.8, 0.1),
                      model_version="v4", track_id=9),
    "track": TrackEventMsg(kind="ended", camera="door", track_id=9, ts=2.0, emotion="Happy", confidence=0.7,
                           previous="Neutral", previous_duration_s=0.5, duration_s=1.5,
                           time_per_emotion_s={"Happy": 1.0, "Neutral": 0.5}),
}
ENCODERS = {"frame": schema.encode_frame, "faces": schema.encode_faces, "event": schema.encode_event,
            "track": schema.encode_track}
KINDS = sorted(SAMPLES)


def current(definition: dict[str, Any]) -> dict[str, Any]:
    """The properties of a definition that exist at this schema version."""
    return {k: v for k, v in definition["properties"].items() if v.get("x-since", 1) <= schema.SCHEMA_VERSION}


def wire(kind: str) -> dict[str, Any]:
    return msgpack.unpackb(ENCODERS[kind](SAMPLES[kind]), raw=False)  # type: ignore[no-any-return]


def as_json_value(value: Any) -> Any:
    """msgpack bin as the string the document declares (contentEncoding binary)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, list):
        return [as_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json_value(v) for k, v in value.items()}
    return value


def validate(value: Any, definition: str) -> None:
    jsonschema.validate(value, {**DOC, "$ref": f"#/$defs/{definition}"})


def test_the_document_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(DOC)


def test_the_current_version_and_every_decodable_one_are_documented() -> None:
    decodable = getattr(schema, "DECODABLE_VERSIONS", (schema.SCHEMA_VERSION,))
    for version in {schema.SCHEMA_VERSION, *decodable}:
        assert str(version) in DOC["x-versions"]
        assert version in DEFS["version"]["enum"]
    since = {p.get("x-since", 1) for d in DEFS.values() for p in d.get("properties", {}).values()}
    assert {str(v) for v in since} <= set(DOC["x-versions"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_msgpack_field_written_is_documented_and_every_documented_one_written(kind: str) -> None:
    written = wire(kind)
    documented = current(DEFS[kind])
    assert set(written) == set(documented), f"{kind}: written {sorted(written)}, documented {sorted(documented)}"
    assert set(DEFS[kind]["required"]) <= set(written)
    assert written["k"] == DEFS[kind]["x-kind"] and written["v"] == schema.SCHEMA_VERSION
    if kind == "faces":
        assert set(written["f"][0]) == set(current(DEFS["face"]))


@pytest.mark.parametrize("kind", KINDS)
def test_documented_fields_name_every_attribute_of_the_message_class(kind: str) -> None:
    cls = getattr(schema, DEFS[kind]["x-dataclass"])
    attributes = {f.name for f in dataclasses.fields(cls)}
    named = {p["x-field"] for p in current(DEFS[kind]).values() if "x-field" in p}
    assert named == attributes
    if kind == "faces":
        assert {p["x-field"] for p in current(DEFS["face"]).values()} == {f.name for f in dataclasses.fields(FaceCrop)}


@pytest.mark.parametrize("kind", KINDS)
def test_written_messages_validate_against_the_document(kind: str) -> None:
    validate(as_json_value(wire(kind)), kind)
    # and the document is strict: an unknown field or a wrong type is refused
    with pytest.raises(jsonschema.ValidationError):
        validate({**as_json_value(wire(kind)), "extra": 1}, kind)
    with pytest.raises(jsonschema.ValidationError):
        validate({**as_json_value(wire(kind)), "cam": 5}, kind)


def test_the_event_json_form_is_the_documented_one() -> None:
    ev = SAMPLES["event"]
    documented = set(current(DEFS["event_json"]))
    assert set(ev.to_dict()) == documented
    assert {p["x-json"] for p in current(DEFS["event"]).values() if "x-json" in p} == documented - {
        "schema_version", "latency_ms"}
    validate(ev.to_dict(), "event_json")
    mqtt_payload = json.loads(event_json(ev))  # what <prefix>/events carries
    assert set(mqtt_payload) == documented
    validate(mqtt_payload, "event_json")


def test_the_track_json_form_is_the_documented_one() -> None:
    full = SAMPLES["track"]
    minimal = TrackEventMsg(kind="started", camera="door", track_id=9, ts=2.0, emotion="Happy", confidence=0.7)
    assert set(full.to_dict()) == set(current(DEFS["track_json"]))
    assert set(minimal.to_dict()) == set(DEFS["track_json"]["required"])
    assert {p["x-json"] for p in current(DEFS["track"]).values() if "x-json" in p} == set(full.to_dict()) - {
        "schema_version"}
    validate(full.to_dict(), "track_json")
    validate(minimal.to_dict(), "track_json")


def test_stream_keys_and_channels_are_the_documented_ones() -> None:
    keys = Keys("es")
    streams = DOC["x-streams"]

    def key(template: str) -> str:
        return template.replace("<prefix>", "es").replace("<camera>", "door").replace("<stream>", keys.events)

    assert DOC["x-prefix-default"] == Keys().prefix
    assert key(streams["frames"]["key"]) == keys.frames("door")
    assert key(streams["faces"]["key"]) == keys.faces
    assert key(streams["events"]["key"]) == keys.events
    assert key(streams["tracks"]["key"]) == keys.tracks
    assert key(streams["events"]["live_channel"]) == keys.events_channel
    assert key(streams["tracks"]["live_channel"]) == keys.tracks_channel
    assert key(streams["dead letters"]["key"]) == keys.dead_letter(keys.events)
    assert DOC["x-entry-field"].encode() == schema.FIELD
    for name, stream in streams.items():
        if "message" in stream:
            assert stream["message"] == f"#/$defs/{DEFS[stream['message'].rsplit('/', 1)[1]]['x-kind']}", name


def test_mqtt_topics_are_the_documented_ones() -> None:
    mqtt = DOC["x-mqtt"]
    topics = Topics(mqtt["prefix-default"])

    def topic(template: str) -> str:
        return (template.replace("<prefix>", topics.prefix).replace("<camera>", "door")
                .replace("<discovery_prefix>", topics.discovery_prefix))

    documented = {topic(t) for t in mqtt["topics"]}
    assert documented == {topics.events, topics.available, topics.tracks("door"), topics.emotion("door"),
                          topics.faces("door"), topics.discovery("door", "emotion"), topics.discovery("door", "faces")}

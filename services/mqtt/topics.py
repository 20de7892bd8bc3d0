"""Topic names and JSON payloads: the frame and track events, the state and Home Assistant discovery."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import shared
from services.mqtt.settings import object_id
from shared.schema import EventMsg, TrackEventMsg

# Fields of EventMsg that its JSON form carries under another shape (a class -> probability map).
RESHAPED = frozenset({"classes", "probs"})
# Characters MQTT gives a meaning in topic names: a camera id holding one cannot name a topic.
TOPIC_SPECIAL = frozenset("+#/\x00")


@dataclass(frozen=True)
class Topics:
    prefix: str
    discovery_prefix: str = "homeassistant"

    @property
    def events(self) -> str:
        return f"{self.prefix}/events"

    @property
    def available(self) -> str:
        return f"{self.prefix}/available"

    def tracks(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/tracks"

    def emotion(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/emotion"

    def faces(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/faces"

    def discovery(self, camera: str, sensor: str) -> str:
        return f"{self.discovery_prefix}/sensor/{object_id(self.prefix)}/{object_id(camera)}_{sensor}/config"

    @property
    def ha_status(self) -> str:
        return f"{self.discovery_prefix}/status"


def usable_camera(camera: str) -> bool:
    return not (set(camera) & TOPIC_SPECIAL)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_list() if hasattr(value, "to_list") else dataclasses.asdict(value)
    return value


def event_json(ev: EventMsg) -> bytes:
    """The event's JSON form (as ``emotion-stream events --json`` prints it).

    Fields the schema adds to ``EventMsg`` later pass through under their own names even before
    ``to_dict`` learns them, so a consumer of this topic sees every field of the wire message.
    """
    body = ev.to_dict()
    for f in dataclasses.fields(ev):
        if f.name not in body and f.name not in RESHAPED:
            body[f.name] = _plain(getattr(ev, f.name))
    return json.dumps(body, separators=(",", ":")).encode()


def track_json(te: TrackEventMsg) -> bytes:
    return json.dumps(te.to_dict(), separators=(",", ":")).encode()


def discovery_configs(topics: Topics, camera: str) -> dict[str, bytes]:
    """Home Assistant sensor configs for one camera (topic -> retained JSON payload)."""
    node = object_id(topics.prefix)
    cam = object_id(camera)
    device = {"identifiers": [f"{node}_{cam}"], "name": f"{camera} emotions", "manufacturer": "emotion-stream",
              "model": "emotion-stream camera", "sw_version": shared.__version__}
    common = {"availability_topic": topics.available, "payload_available": "online",
              "payload_not_available": "offline", "device": device,
              "origin": {"name": "emotion-stream", "sw_version": shared.__version__}}
    sensors = {
        "emotion": {"name": "Emotion", "state_topic": topics.emotion(camera), "icon": "mdi:emoticon-outline"},
        "faces": {"name": "Faces", "state_topic": topics.faces(camera), "icon": "mdi:face-recognition",
                  "state_class": "measurement", "unit_of_measurement": "faces"},
    }
    return {topics.discovery(camera, sensor): json.dumps(
                {**spec, "unique_id": f"{node}_{cam}_{sensor}", "object_id": f"{node}_{cam}_{sensor}", **common},
                separators=(",", ":")).encode()
            for sensor, spec in sensors.items()}

"""MQTT output settings: the broker, the topics, Home Assistant discovery."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator, model_validator

from shared.settings import Section, ServiceSettings

# A topic level that MQTT would read as a wildcard or a separator cannot be part of a prefix
# (``/`` is allowed in the prefix itself: it may name several levels).
TOPIC_PREFIX = r"^[^#+\x00]+$"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class MqttOptions(Section):
    url: str = Field("", description="broker: mqtt://[user:password@]host[:port] (1883), or mqtts:// for TLS "
                     "(8883); required")
    username: str | None = Field(None, description="user name, when not in the URL")
    password: str | None = Field(None, description="password, when not in the URL")
    client_id: str = Field("", max_length=64, description="MQTT client id (default emotion-stream-<host>)")
    topic_prefix: str = Field("emotion-stream", min_length=1, max_length=64, pattern=TOPIC_PREFIX,
                              description="first level(s) of every topic: <prefix>/events, <prefix>/<camera>/...")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval")
    tls_ca_certs: Path | None = Field(None, description="CA bundle for mqtts:// (default: the system's)")
    tls_certfile: Path | None = Field(None, description="client certificate for mqtts://")
    tls_keyfile: Path | None = Field(None, description="client key for mqtts://")
    tls_insecure: bool = Field(False, description="mqtts://: skip the host name check (test brokers only)")
    backoff_initial_s: float = Field(0.5, gt=0, le=60, description="first reconnect delay")
    backoff_max_s: float = Field(30.0, gt=0, le=600, description="cap of the reconnect delay")
    ack_timeout_s: float = Field(30.0, gt=0, le=3600,
                                 description="a connected broker that has not acknowledged a message this long: the "
                                             "entry stays pending in Redis and is published again")
    group: str = Field("mqtt", min_length=1, description="consumer group on the events and tracks streams")
    new_group_from: Literal["now", "start"] = Field(
        "now", description="where a new consumer group starts: 'now' (events from then on) or 'start' (everything "
                           "the streams still hold)")
    read_count: int = Field(64, ge=1, le=1000, description="entries taken per XREADGROUP")
    state_ttl_s: float = Field(10.0, gt=0, le=3600, description="a face not seen this long no longer counts in "
                               "the retained per-camera state (tracks normally end sooner, with an event)")
    cameras_refresh_s: float = Field(5.0, gt=0, le=600, description="how often to look for added or removed cameras")
    discovery: bool = Field(False, description="publish Home Assistant MQTT discovery configs (one device per "
                            "camera with an emotion and a face-count sensor)")
    discovery_prefix: str = Field("homeassistant", min_length=1, max_length=64, pattern=TOPIC_PREFIX,
                                  description="Home Assistant's discovery prefix")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v:
            return v
        parts = urlsplit(v)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"unsupported scheme {parts.scheme!r}; use mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("no host in the URL")
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return v

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttOptions:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(f"mqtt.backoff_initial_s ({self.backoff_initial_s}) must not exceed "
                             f"mqtt.backoff_max_s ({self.backoff_max_s})")
        return self


@dataclass(frozen=True)
class Broker:
    """Where and how to connect, from the URL and the separate fields."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    client_id: str


def broker(opts: MqttOptions) -> Broker:
    parts = urlsplit(opts.url)
    username = unquote(parts.username) if parts.username else opts.username
    password = unquote(parts.password) if parts.password else opts.password
    client_id = opts.client_id or f"emotion-stream-{socket.gethostname()}"[:64]
    return Broker(host=parts.hostname or "", port=parts.port or DEFAULT_PORTS[parts.scheme],
                  tls=parts.scheme == "mqtts", username=username, password=password, client_id=client_id)


def object_id(name: str) -> str:
    """``name`` as Home Assistant accepts in a discovery topic level and an id."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


class MqttSettings(ServiceSettings):
    mqtt: MqttOptions = MqttOptions()

    @model_validator(mode="after")
    def _url_given(self) -> MqttSettings:
        if not self.mqtt.url:
            raise ValueError("mqtt.url = '': required (mqtt://[user:password@]host[:port] or mqtts://...; "
                             "ES_MQTT__URL in the environment)")
        return self

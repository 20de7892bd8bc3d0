"""MQTT output: frame and track events from Redis to an MQTT broker, at least once.

Order of hand-offs: entries are read from the events and tracks streams in the consumer group;
each becomes one QoS 1 message; the worker waits for the broker's PUBACK of every message of
the batch and only then XACKs those entries. A crash (or kill -9) in between leaves them
pending: the next run under the same consumer name reads its own pending entries first, and
entries left by a consumer that never returns are taken over after ``streams.claim_idle_ms``.
Either way they are published again: a subscriber may see a message twice (same ``event_id``),
never miss one. While the broker is away nothing is read; what it had not acknowledged is sent
again after the reconnect.

Retained state (``<prefix>/<camera>/emotion`` and ``.../faces``) and Home Assistant discovery
configs are derived, so they are published without holding up acks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge

from services.mqtt.broker import BrokerLink
from services.mqtt.settings import MqttSettings
from services.mqtt.state import CameraState, Presence, Summary
from services.mqtt.topics import Topics, discovery_configs, event_json, track_json, usable_camera
from shared.cameras import CameraRegistry
from shared.health import CommonMetrics
from shared.schema import DecodeError, decode_event, decode_track
from shared.streams import CONNECTION_ERRORS, Backoff, Entry, parse_read, retry_forever
from shared.worker import Stopper, StreamWorker

log = logging.getLogger(__name__)


class MqttMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "mqtt")
        self.published = Counter("es_mqtt_published_total", "MQTT messages handed to the broker, by kind "
                                 "(event, track, state, discovery, availability)", ["kind"], registry=registry)
        self.acked = Counter("es_mqtt_acked_total", "Stream entries acked after the broker acknowledged their message",
                             ["stream"], registry=registry)
        self.unacked = Counter("es_mqtt_unacknowledged_total", "Messages the broker did not acknowledge in time or "
                               "paho could not queue: their entries stay pending and are published again",
                               registry=registry)
        self.dropped = Counter("es_mqtt_dropped_total", "Stream entries not published, by reason (undecodable: "
                               "dead-lettered; bad_topic: a camera id MQTT cannot put in a topic)", ["reason"],
                               registry=registry)
        self.reconnects = Counter("es_mqtt_reconnects_total", "Failed connection attempts and lost connections "
                                  "(each followed by a backoff delay)", registry=registry)
        self.connected = Gauge("es_mqtt_connected", "1 while connected to the broker", registry=registry)


@dataclass
class Sent:
    """An entry and the messages it became (none when nothing is published for it)."""

    entry: Entry
    messages: list[mqtt.MQTTMessageInfo]


class MqttWorker(StreamWorker):
    service = "mqtt"

    def __init__(self, settings: MqttSettings, r: redis.Redis, metrics: MqttMetrics,
                 stopper: Stopper | None = None) -> None:
        super().__init__(settings, r, settings.mqtt.group, metrics, stopper)
        self.opts = settings.mqtt
        self.metrics = metrics
        self.topics = Topics(self.opts.topic_prefix, self.opts.discovery_prefix)
        self.presence = Presence(self.opts.state_ttl_s)
        self.registry = CameraRegistry(r, settings.redis.prefix)
        self.announced_key = f"{settings.redis.prefix}:mqtt:cameras"
        subs = {self.topics.ha_status: self._on_ha_status} if self.opts.discovery else {}
        self.link = BrokerLink(self.opts, metrics, on_connect=self._on_connect, subscriptions=subs)
        self._resync = False
        self._replay = True  # first read what this consumer left pending in an earlier run
        self._announced: set[str] = set()
        self._state_sent: dict[str, Summary] = {}
        self._cameras_at = 0.0
        self._stop_seen: float | None = None

    # -- StreamWorker ---------------------------------------------------------

    def streams(self) -> list[str]:
        return [self.keys.events, self.keys.tracks]

    def read_count(self) -> int:
        return self.opts.read_count

    def run(self) -> None:
        created = retry_forever(self._create_groups, Backoff(0.2, 5.0), lambda: self.stopper.stopping,
                                "creating consumer groups")
        if created is None:
            return
        self.link.start()
        try:
            super().run()
        finally:
            self.link.close()

    def step(self) -> None:
        if not self.link.connected.is_set():
            self.stopper.wait(0.1)  # nothing is read while the broker is away: entries wait in Redis
            return
        if self._resync:
            self._resync = False
            self._announced.clear()
            self._state_sent.clear()
            self._cameras_at = 0.0
        self._refresh_cameras()
        self.presence.expire()
        self._publish_state()
        if self._replay:
            own = self._own_pending()
            if own:
                self.handle(own)
                return
            self._replay = False
        super().step()

    def handle(self, entries: list[Entry]) -> None:
        sent = [s for s in (self._send(e) for e in entries) if s is not None]
        self._publish_state()
        with self.clock.writing():  # the broker's PUBACKs: this stage's output
            results = self.link.wait_acked([m for s in sent for m in s.messages], self.opts.ack_timeout_s,
                                           self._give_up_waiting, self.heartbeat.beat)
        done: list[Entry] = []
        at = 0
        for s in sent:
            ok = all(results[at:at + len(s.messages)])
            at += len(s.messages)
            if ok:
                done.append(s.entry)
        if len(done) < len(sent):
            self.metrics.unacked.inc(len(sent) - len(done))
            self._replay = True
            log.warning("%d of %d entries not acknowledged by the broker; they stay pending and are published again",
                        len(sent) - len(done), len(sent))
        with self.clock.writing():
            self._ack(done)

    def _give_up_waiting(self) -> bool:
        """On a stop, acks in flight get ``streams.drain_timeout_s`` (none while the broker is away);
        what is still unacknowledged then stays pending for the next run."""
        if not self.stopper.stopping:
            return False
        if self._stop_seen is None:
            self._stop_seen = time.monotonic()
        waited = time.monotonic() - self._stop_seen
        return not self.link.connected.is_set() or waited > self.settings.streams.drain_timeout_s

    def ready(self) -> tuple[bool, str]:
        try:
            self.r.ping()
        except CONNECTION_ERRORS as exc:
            return False, f"redis: {exc}"
        if not self.link.connected.is_set():
            return False, f"mqtt: not connected to {self.link.target.host}:{self.link.target.port}"
        return True, "redis ok, mqtt connected"

    # -- entries --------------------------------------------------------------

    def _create_groups(self) -> bool:
        position = "$" if self.opts.new_group_from == "now" else "0"
        for stream in self.streams():
            try:
                self.r.xgroup_create(stream, self.group, id=position, mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return True

    def _own_pending(self) -> list[Entry]:
        entries: list[Entry] = []
        for stream in self.streams():
            reply = self.r.xreadgroup(self.group, self.consumer, {stream: "0"}, count=self.read_count())
            entries += parse_read(reply)
        return entries

    def _send(self, entry: Entry) -> Sent | None:
        """Publish one entry's message; None when the entry was dead-lettered instead."""
        try:
            if entry.stream == self.keys.events:
                ev = decode_event(entry.payload or b"")
                self.presence.event(ev)
                return Sent(entry, [self._publish(self.topics.events, event_json(ev), "event")])
            te = decode_track(entry.payload or b"")
        except DecodeError as exc:
            pipe = self.pipeline()
            self.dead_letter(pipe, entry, exc.reason, exc.detail)
            pipe.execute()
            self.metrics.dropped.labels(reason="undecodable").inc()
            return None
        if not usable_camera(te.camera):
            log.warning("track event of camera %r not published: MQTT topics cannot hold it", te.camera)
            self.metrics.dropped.labels(reason="bad_topic").inc()
            return Sent(entry, [])
        self.presence.track_event(te)
        return Sent(entry, [self._publish(self.topics.tracks(te.camera), track_json(te), "track")])

    def _publish(self, topic: str, payload: bytes, kind: str, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.link.publish(topic, payload, retain=retain)
        self.metrics.published.labels(kind=kind).inc()
        return info

    def _ack(self, entries: list[Entry]) -> None:
        if not entries:
            return
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.id)
        pipe = self.r.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self.group, *ids)
        pipe.execute()
        for stream, ids in by_stream.items():
            self.metrics.acked.labels(stream=stream).inc(len(ids))

    # -- retained state and discovery -------------------------------------------

    def _publish_state(self) -> None:
        for camera, summary in self.presence.summaries().items():
            if self._state_sent.get(camera) == summary or not usable_camera(camera):
                continue
            self._publish(self.topics.emotion(camera), summary.emotion.encode(), "state", retain=True)
            self._publish(self.topics.faces(camera), str(summary.faces).encode(), "state", retain=True)
            self._state_sent[camera] = summary

    def _refresh_cameras(self) -> None:
        now = time.monotonic()
        if now - self._cameras_at < self.opts.cameras_refresh_s:
            return
        self._cameras_at = now
        known = {c for c in self._known_cameras() if usable_camera(c)}
        for camera in sorted(known - self._announced):
            self._announce(camera)
        # Cameras of earlier runs count as removed only once some camera is known: a pipeline
        # starting up has announced none yet. Those this run announced go when they go.
        earlier = {_text(c) for c in self.r.smembers(self.announced_key)} if known else set()
        for camera in sorted((earlier | self._announced) - known):
            self._withdraw(camera)

    def _known_cameras(self) -> set[str]:
        announced = {_text(c) for c in self.r.smembers(self.keys.cameras)}
        return announced | {_text(c) for c in self.r.hkeys(self.registry.config_key)}

    def _announce(self, camera: str) -> None:
        self.presence.cameras.setdefault(camera, CameraState())
        if self.opts.discovery:
            for topic, payload in discovery_configs(self.topics, camera).items():
                self._publish(topic, payload, "discovery", retain=True)
        self.r.sadd(self.announced_key, camera)
        self._announced.add(camera)
        log.info("camera %s: state topics%s published", camera, " and discovery configs" if self.opts.discovery else "")

    def _withdraw(self, camera: str) -> None:
        """A removed camera: its retained state and (with discovery) its Home Assistant entities go."""
        topics = [self.topics.emotion(camera), self.topics.faces(camera)]
        if self.opts.discovery:
            topics += list(discovery_configs(self.topics, camera))
        for topic in topics:
            # an empty retained message deletes the retained one; for a discovery config, the entity
            self._publish(topic, b"", "discovery" if "/config" in topic else "state", retain=True)
        self.presence.forget(camera)
        self._state_sent.pop(camera, None)
        self._announced.discard(camera)
        self.r.srem(self.announced_key, camera)
        log.info("camera %s removed: its retained topics%s cleared", camera,
                 " and discovery configs" if self.opts.discovery else "")

    # -- broker callbacks (network thread) ---------------------------------------

    def _on_connect(self) -> None:
        self._resync = True  # a new broker session may have lost retained state: send it again

    def _on_ha_status(self, payload: bytes) -> None:
        if payload == b"online":
            self._resync = True  # Home Assistant restarted: it asks for the discovery configs again


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

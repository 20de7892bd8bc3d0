"""The broker connection: paho's network loop in a thread that reconnects with capped backoff.

Messages go out with QoS 1. :meth:`BrokerLink.wait_acked` blocks until the broker acknowledged
a set of them (PUBACK); the worker acks their Redis entries only then. A message in flight when
the connection drops is sent again by paho after the reconnect (flagged as a duplicate), so a
broker restart delays messages but loses none of those already handed to the link.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from services.mqtt.settings import MqttOptions, broker
from shared.streams import Backoff

log = logging.getLogger(__name__)

QOS = 1
ONLINE, OFFLINE = b"online", b"offline"
LOOP_TIMEOUT_S = 0.1
ACK_POLL_S = 0.02
MAX_INFLIGHT = 100


class LinkMetrics(Protocol):
    """What the link reports; the worker's metrics object provides these."""

    reconnects: Any
    connected: Any
    published: Any


class BrokerLink:
    def __init__(self, opts: MqttOptions, metrics: LinkMetrics, on_connect: Callable[[], None] | None = None,
                 subscriptions: Mapping[str, Callable[[bytes], None]] | None = None) -> None:
        self.opts = opts
        self.target = broker(opts)
        self.metrics = metrics
        self.availability = f"{opts.topic_prefix}/available"
        self.connected = threading.Event()
        self._on_connect_hook = on_connect
        self._subscriptions = subscriptions or {}
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._acked = threading.Condition()
        self._backoff = Backoff(opts.backoff_initial_s, opts.backoff_max_s)
        self._ever_connected = False
        self.client = self._make_client()
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.target.client_id, clean_session=True,
                             reconnect_on_failure=False)
        if self.target.username is not None:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            client.tls_set(ca_certs=_opt(self.opts.tls_ca_certs), certfile=_opt(self.opts.tls_certfile),
                           keyfile=_opt(self.opts.tls_keyfile), cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(self.opts.tls_insecure)
        # The broker publishes this for us when the connection dies without a DISCONNECT (a crash,
        # kill -9, a network cut), so subscribers and Home Assistant see the service go away.
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.will_set(self.availability, OFFLINE, qos=QOS, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        return client

    # -- lifecycle --------------------------------------------------------

    def start(self) -> BrokerLink:
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Announce ``offline`` (a clean DISCONNECT sends no last will), then disconnect."""
        if self.connected.is_set():
            info = self.client.publish(self.availability, OFFLINE, qos=QOS, retain=True)
            self.wait_acked([info], timeout=timeout, stopping=lambda: not self.connected.is_set())
            self._closing.set()
            self.client.disconnect()  # the network thread sends it, then its loop ends
            self._thread.join(timeout)
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.connect(self.target.host, self.target.port, keepalive=self.opts.keepalive_s)
            except (OSError, ValueError) as exc:
                self._wait("connect failed", exc)
                continue
            rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
            while not self._stop.is_set() and rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                rc = self.client.loop(timeout=LOOP_TIMEOUT_S)
            self._lost()
            if self._closing.is_set():
                return
            if not self._stop.is_set():
                self._wait("connection lost", mqtt.error_string(rc))

    def _wait(self, what: str, why: object) -> None:
        delay = self._backoff.next_delay()
        self.metrics.reconnects.inc()
        log.warning("mqtt: %s to %s:%d (%s); reconnecting in %.2fs", what, self.target.host, self.target.port,
                    why, delay)
        self._stop.wait(delay)

    def _lost(self) -> None:
        self.connected.clear()
        self.metrics.connected.set(0)
        with self._acked:
            self._acked.notify_all()

    # -- paho callbacks (network thread) ------------------------------------

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("mqtt: broker %s:%d refused the connection: %s", self.target.host, self.target.port, reason)
            return  # the broker closes the socket; the loop backs off and tries again
        log.info("mqtt: connected to %s:%d%s", self.target.host, self.target.port,
                 " (again)" if self._ever_connected else "")
        self._ever_connected = True
        self._backoff.reset()
        client.publish(self.availability, ONLINE, qos=QOS, retain=True)
        self.metrics.published.labels(kind="availability").inc()
        for topic in self._subscriptions:
            client.subscribe(topic, qos=QOS)
        self.connected.set()
        self.metrics.connected.set(1)
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._lost()

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._acked:
            self._acked.notify_all()

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        handler = self._subscriptions.get(message.topic)
        if handler is not None:
            handler(bytes(message.payload))

    # -- publishing (worker thread) ------------------------------------------

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Queue one QoS 1 message; while disconnected paho keeps it and sends it after the reconnect."""
        return self.client.publish(topic, payload, qos=QOS, retain=retain)

    def wait_acked(self, infos: Sequence[mqtt.MQTTMessageInfo], timeout: float, stopping: Callable[[], bool],
                   beat: Callable[[], None] | None = None) -> list[bool]:
        """For each message, whether the broker acknowledged it (PUBACK).

        Waits until each is acknowledged or failed (not queued: paho refused it), a stop, or
        ``timeout``. The timeout runs only while connected: a broker that is away is waited for
        (paho resends in-flight messages on reconnect); one connected but silent is given up on.
        """
        waited = 0.0
        while True:
            states = [_state(i) for i in infos]
            if all(s is not None for s in states) or stopping() or waited >= timeout:
                return [s is True for s in states]
            started = time.monotonic()
            with self._acked:
                # paho signals on_publish just before it marks the message published: wait briefly
                self._acked.wait(ACK_POLL_S)
            if self.connected.is_set():
                waited += time.monotonic() - started
            if beat is not None:
                beat()


def _state(info: mqtt.MQTTMessageInfo) -> bool | None:
    """True: acknowledged; False: paho did not queue it (full queue, no connection); None: in flight."""
    try:
        return True if info.is_published() else None
    except (RuntimeError, ValueError):
        return False

def _opt(path: Any) -> str | None:
    return None if path is None else str(path)
